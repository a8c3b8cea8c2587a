//! Batch scripts for clusters: `--launcher slurm|pbs` writes a job script
//! that runs the same `chatvec sft` on every node of the allocation, each
//! with its node rank and the first node's address as the master. The job
//! is then the scheduler's (sbatch / qsub); chatvec does not launch it.
//!
//! The script calls itself once per node (srun, or mpirun with one process
//! per node on PBS, as ABCI runs multi-node jobs), so it must sit on a
//! filesystem the nodes share, as do the run directory and the binary.

use std::path::Path;

use crate::error::{Error, Result};
use crate::sft::shell_line;

/// Refuses a value a job script cannot carry. A control character is the
/// danger: a newline ends a `#SBATCH` line or a comment, and the rest of
/// the name then runs as a command on every node. Everything else reaches
/// the script shell-quoted.
fn carryable(what: &str, value: &str) -> Result<()> {
    match value.chars().find(|c| c.is_control()) {
        None => Ok(()),
        Some(c) => Err(Error::Usage(format!(
            "{what} '{}' holds a control character ({}), which a job script cannot carry safely",
            value.escape_debug(),
            c.escape_default()
        ))
        .with_hint("rename it, or run from a directory whose path has no newline or control character")),
    }
}

/// `path` and then chatvec's own `suffix` as a scheduler directive's value
/// (`#SBATCH --output=`, `#PBS -o`): bare when it is plain, else in double
/// quotes, which both parse; a quote or backslash there is refused. Slurm
/// expands `%` patterns in file names, so a `%` of the path is written
/// `%%` (the suffix's `%j` stays a pattern).
fn directive_path(path: &str, suffix: &str, slurm: bool) -> Result<String> {
    carryable("the job log path", path)?;
    let p = if slurm { path.replace('%', "%%") } else { path.to_string() } + suffix;
    if p.chars().all(|c| c.is_ascii_alphanumeric() || "-_./+,@=:%".contains(c)) {
        return Ok(p);
    }
    if p.contains(['"', '\\']) {
        return Err(Error::Usage(format!(
            "the job log path '{}' holds a double quote or backslash, which a scheduler directive cannot carry",
            path.escape_debug()
        ))
        .with_hint("choose an output directory whose path has neither"));
    }
    Ok(format!("\"{p}\""))
}

/// What the cluster asks of a job besides its size: where it runs, who
/// pays, how long it may take, any other directive, what each node runs
/// first (modules, a container's or venv's activation), and the Python
/// interpreter to use.
#[derive(Default)]
pub(crate) struct Scheduling<'a> {
    pub partition: Option<&'a str>,
    pub account: Option<&'a str>,
    pub time: Option<&'a str>,
    pub directives: &'a [String],
    pub setup: &'a [String],
    pub python: Option<&'a Path>,
}

/// A scheduler directive's value: plain characters only (the scheduler
/// reads it, not a shell), no control character.
fn directive_value(what: &str, v: &str) -> Result<String> {
    carryable(what, v)?;
    if v.is_empty() || !v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:+,@=/%".contains(c)) {
        return Err(Error::Usage(format!(
            "{what} '{}': expected letters, digits and - _ . : + , @ = / % only",
            v.escape_debug()
        )));
    }
    Ok(v.to_string())
}

/// The directive lines `sched` adds, for `launcher`.
fn directives(launcher: &str, sched: &Scheduling<'_>) -> Result<String> {
    let mut out = String::new();
    let pbs = launcher == "pbs";
    let tag = if pbs { "#PBS" } else { "#SBATCH" };
    if let Some(p) = sched.partition {
        let p = directive_value("--partition", p)?;
        out.push_str(&if pbs { format!("{tag} -q {p}\n") } else { format!("{tag} --partition={p}\n") });
    }
    if let Some(a) = sched.account {
        let a = directive_value("--account", a)?;
        out.push_str(&if pbs { format!("{tag} -A {a}\n") } else { format!("{tag} --account={a}\n") });
    }
    if let Some(t) = sched.time {
        let t = directive_value("--time", t)?;
        out.push_str(&if pbs { format!("{tag} -l walltime={t}\n") } else { format!("{tag} --time={t}\n") });
    }
    for d in sched.directives {
        // Written as given after the tag: the scheduler parses it, and a
        // line break is the only way out of the directive.
        carryable("--sched-arg", d)?;
        if d.trim().is_empty() {
            return Err(Error::Usage("--sched-arg: empty directive".into()));
        }
        out.push_str(&format!("{tag} {}\n", d.trim()));
    }
    Ok(out)
}

/// The job script for `launcher` (`slurm` or `pbs`). `args` run the job on
/// one node without `--node-rank`/`--master-addr`; `script` is where the
/// script is written and `cwd` the directory relative paths are from.
/// Every value is checked (`carryable`) and shell-quoted.
#[allow(clippy::too_many_arguments)]
pub(crate) fn job_script(
    launcher: &str,
    chatvec: &Path,
    args: &[String],
    nnodes: u64,
    nproc: u64,
    script: &Path,
    cwd: &Path,
    sched: &Scheduling<'_>,
) -> Result<String> {
    for (i, a) in args.iter().enumerate() {
        let flag = args[..i].iter().rev().find(|p| p.starts_with('-')).map_or("an argument", String::as_str);
        carryable(&format!("the value of {flag}"), a)?;
    }
    carryable("the working directory", &cwd.to_string_lossy())?;
    carryable("the chatvec binary's path", &chatvec.to_string_lossy())?;
    carryable("the job script's path", &script.to_string_lossy())?;
    let cmd =
        format!("\"$CHATVEC\" {} --node-rank \"$RANK\" --master-addr \"$MASTER_ADDR\"", shell_line(args));
    let q = |p: &Path| shell_line(&[p.display().to_string()]);
    let log = script.display().to_string();
    let (head, fan_out, rank) = match launcher {
        "pbs" => (
            format!(
                "#PBS -N chatvec-sft\n#PBS -l select={nnodes}:ngpus={nproc}\n#PBS -j oe\n#PBS -o {}\n",
                directive_path(&log, ".out", false)?
            ),
            format!(
                "  MASTER_ADDR=$(head -n 1 \"$PBS_NODEFILE\")\n  export MASTER_ADDR\n  exec mpirun -np {nnodes} -npernode 1 -hostfile <(sort -u \"$PBS_NODEFILE\") -x MASTER_ADDR bash {} --node\n",
                q(script)
            ),
            "RANK=${OMPI_COMM_WORLD_RANK:-${PMI_RANK:-}}",
        ),
        // The first host without a pipe: `scontrol ... | head` dies of
        // SIGPIPE under pipefail whenever head exits first.
        _ => (
            format!(
                "#SBATCH --job-name=chatvec-sft\n#SBATCH --nodes={nnodes}\n#SBATCH --ntasks-per-node=1\n#SBATCH --gpus-per-node={nproc}\n#SBATCH --output={}\n",
                directive_path(&log, "-%j.out", true)?
            ),
            format!(
                "  nodes=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\")\n  MASTER_ADDR=${{nodes%%$'\\n'*}}\n  export MASTER_ADDR\n  exec srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash {} --node\n",
                q(script)
            ),
            "RANK=${SLURM_NODEID:-}",
        ),
    };
    let extra = directives(launcher, sched)?;
    // Each node's own set-up (modules, an environment's activation), as
    // given: the user's shell lines, checked to be one line each.
    let mut setup = String::new();
    for line in sched.setup {
        carryable("--job-setup", line)?;
        setup.push_str(line.trim());
        setup.push('\n');
    }
    if let Some(p) = sched.python {
        carryable("the Python interpreter's path", &p.to_string_lossy())?;
        setup.push_str(&format!("CHATVEC_PYTHON=${{CHATVEC_PYTHON:-{}}}\nexport CHATVEC_PYTHON\n", q(p)));
    }
    Ok(format!(
        "#!/bin/bash\n{head}{extra}# Written by chatvec {version}. Runs `chatvec sft` on each of the {nnodes} node(s),\n# {nproc} process(es) per node; submit it with {submit} {script}\nset -euo pipefail\nCHATVEC=${{CHATVEC:-{exe}}}\nexport CHATVEC\ncd {cwd}\nif [ \"${{1:-}}\" != --node ]; then\n{fan_out}fi\n{setup}{rank}\nif [ -z \"$RANK\" ]; then echo 'chatvec: no node rank from the launcher' >&2; exit 2; fi\nexec {cmd}\n",
        version = env!("CARGO_PKG_VERSION"),
        submit = if launcher == "pbs" { "qsub" } else { "sbatch" },
        script = q(script),
        exe = q(chatvec),
        cwd = q(cwd),
    ))
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
            &Scheduling::default(),
        )
        .unwrap();
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
        let pbs = job_script(
            "pbs",
            Path::new("/bin/chatvec"),
            &args,
            4,
            8,
            Path::new("/r.pbs"),
            Path::new("/w"),
            &Scheduling::default(),
        )
        .unwrap();
        assert!(
            pbs.contains("#PBS -l select=4:ngpus=8\n") && pbs.contains("mpirun -np 4 -npernode 1"),
            "{pbs}"
        );
        assert!(pbs.contains("OMPI_COMM_WORLD_RANK"), "{pbs}");
    }

    /// Partition, account, time and other directives land as the
    /// scheduler reads them, the set-up lines and the interpreter before
    /// chatvec; a value that would break out of its line is refused.
    #[test]
    fn scheduling_directives_setup_and_interpreter_are_written_and_checked() {
        let args: Vec<String> = ["sft", "-o", "/r"].iter().map(|s| s.to_string()).collect();
        let directives = vec!["--qos=high".to_string(), "--constraint=h100".to_string()];
        let setup = vec!["module load cuda/12.4".to_string()];
        let sched = Scheduling {
            partition: Some("gpu"),
            account: Some("lab-42"),
            time: Some("24:00:00"),
            directives: &directives,
            setup: &setup,
            python: Some(Path::new("/shared/venv/bin/python")),
        };
        let run = |l: &str, sched: &Scheduling<'_>| {
            job_script(l, Path::new("/bin/chatvec"), &args, 2, 8, Path::new("/r.job"), Path::new("/w"), sched)
        };
        let slurm = run("slurm", &sched).unwrap();
        for line in [
            "#SBATCH --partition=gpu\n",
            "#SBATCH --account=lab-42\n",
            "#SBATCH --time=24:00:00\n",
            "#SBATCH --qos=high\n",
            "#SBATCH --constraint=h100\n",
            "module load cuda/12.4\n",
            "CHATVEC_PYTHON=${CHATVEC_PYTHON:-/shared/venv/bin/python}\nexport CHATVEC_PYTHON\n",
        ] {
            assert!(slurm.contains(line), "{line}: {slurm}");
        }
        // Directives come before the first command (sbatch stops reading them there).
        assert!(slurm.find("#SBATCH --qos").unwrap() < slurm.find("set -euo").unwrap());
        let pbs = run("pbs", &sched).unwrap();
        for line in ["#PBS -q gpu\n", "#PBS -A lab-42\n", "#PBS -l walltime=24:00:00\n", "#PBS --qos=high\n"]
        {
            assert!(pbs.contains(line), "{line}: {pbs}");
        }
        for bad in ["gpu\n#SBATCH --x", "gpu; rm -rf /", "a b"] {
            let s = Scheduling { partition: Some(bad), ..Scheduling::default() };
            assert!(run("slurm", &s).is_err(), "{bad}");
        }
        let injected = vec!["--qos=x\nrm -rf /".to_string()];
        assert!(run("slurm", &Scheduling { directives: &injected, ..Scheduling::default() }).is_err());
        assert!(run("slurm", &Scheduling { setup: &injected, ..Scheduling::default() }).is_err());
    }
}
