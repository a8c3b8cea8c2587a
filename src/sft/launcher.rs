//! Batch scripts for clusters: `--launcher slurm|pbs` writes a job script
//! that runs the same `chatvec sft` on every node of the allocation, each
//! with its node rank and the first node's address as the master. The job
//! is then the scheduler's (sbatch / qsub); chatvec does not launch it.
//!
//! The script calls itself once per node (srun, or mpirun with one process
//! per node on PBS, as ABCI runs multi-node jobs), so it must sit on a
//! filesystem the nodes share, as do the run directory and the binary.

use std::path::Path;

use crate::sft::shell_line;

/// The job script for `launcher` (`slurm` or `pbs`). `args` run the job on
/// one node without `--node-rank`/`--master-addr`; `script` is where the
/// script is written and `cwd` the directory relative paths are from.
pub(crate) fn job_script(
    launcher: &str,
    chatvec: &Path,
    args: &[String],
    nnodes: u64,
    nproc: u64,
    script: &Path,
    cwd: &Path,
) -> String {
    let cmd =
        format!("\"$CHATVEC\" {} --node-rank \"$RANK\" --master-addr \"$MASTER_ADDR\"", shell_line(args));
    let q = |p: &Path| shell_line(&[p.display().to_string()]);
    let (head, fan_out, rank) = match launcher {
        "pbs" => (
            format!(
                "#PBS -N chatvec-sft\n#PBS -l select={nnodes}:ngpus={nproc}\n#PBS -j oe\n#PBS -o {}.out\n",
                script.display()
            ),
            format!(
                "  MASTER_ADDR=$(head -n 1 \"$PBS_NODEFILE\")\n  export MASTER_ADDR\n  exec mpirun -np {nnodes} -npernode 1 -hostfile <(sort -u \"$PBS_NODEFILE\") -x MASTER_ADDR bash {} --node\n",
                q(script)
            ),
            "RANK=${OMPI_COMM_WORLD_RANK:-${PMI_RANK:-}}",
        ),
        _ => (
            format!(
                "#SBATCH --job-name=chatvec-sft\n#SBATCH --nodes={nnodes}\n#SBATCH --ntasks-per-node=1\n#SBATCH --gpus-per-node={nproc}\n#SBATCH --output={}-%j.out\n",
                script.display()
            ),
            format!(
                "  MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)\n  export MASTER_ADDR\n  exec srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash {} --node\n",
                q(script)
            ),
            "RANK=${SLURM_NODEID:-}",
        ),
    };
    format!(
        "#!/bin/bash\n{head}# Written by chatvec {version}. Runs `chatvec sft` on each of the {nnodes} node(s),\n# {nproc} process(es) per node; submit it with {submit} {script}.\nset -euo pipefail\nCHATVEC=${{CHATVEC:-{exe}}}\nexport CHATVEC\ncd {cwd}\nif [ \"${{1:-}}\" != --node ]; then\n{fan_out}fi\n{rank}\nif [ -z \"$RANK\" ]; then echo 'chatvec: no node rank from the launcher' >&2; exit 2; fi\nexec {cmd}\n",
        version = env!("CARGO_PKG_VERSION"),
        submit = if launcher == "pbs" { "qsub" } else { "sbatch" },
        script = script.display(),
        exe = q(chatvec),
        cwd = q(cwd),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_run_the_job_on_every_node_with_its_rank() {
        let args: Vec<String> =
            ["sft", "--model", "/m", "--data", "d.jsonl", "-o", "/r", "--nnodes", "4", "--nproc", "8"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        let slurm = job_script(
            "slurm",
            Path::new("/bin/chatvec"),
            &args,
            4,
            8,
            Path::new("/r.slurm"),
            Path::new("/w"),
        );
        assert!(
            slurm.starts_with("#!/bin/bash\n#SBATCH --job-name=chatvec-sft\n#SBATCH --nodes=4\n"),
            "{slurm}"
        );
        assert!(
            slurm.contains("#SBATCH --gpus-per-node=8\n") && slurm.contains("srun --kill-on-bad-exit=1"),
            "{slurm}"
        );
        assert!(slurm.contains("RANK=${SLURM_NODEID:-}") && slurm.contains("cd /w\n"), "{slurm}");
        assert!(
            slurm.ends_with("exec \"$CHATVEC\" sft --model /m --data d.jsonl -o /r --nnodes 4 --nproc 8 --node-rank \"$RANK\" --master-addr \"$MASTER_ADDR\"\n"),
            "{slurm}"
        );
        let pbs =
            job_script("pbs", Path::new("/bin/chatvec"), &args, 4, 8, Path::new("/r.pbs"), Path::new("/w"));
        assert!(
            pbs.contains("#PBS -l select=4:ngpus=8\n") && pbs.contains("mpirun -np 4 -npernode 1"),
            "{pbs}"
        );
        assert!(pbs.contains("OMPI_COMM_WORLD_RANK"), "{pbs}");
    }
}
