//! The `--dry-run` listing: every input, and per shard every output tensor
//! with its formula or merge method and parameters.

use std::fmt::Write as _;

use crate::merge::methods::Method;
use crate::plan::{Formula, Op, Plan, Requantized, Source};
use crate::units::human_bytes;

impl Plan {
    /// A readable listing of the plan, for `--dry-run`.
    pub(crate) fn describe(&self) -> String {
        let mut out = String::new();
        for i in &self.inputs {
            let _ = write!(
                out,
                "input {:?} {}: {} ({} shards)",
                i.role,
                i.label,
                i.ckpt.dir.display(),
                i.ckpt.shards.len()
            );
            if let Some(o) = &i.ckpt.origin {
                let _ = write!(out, " {}@{} commit {}", o.repo, o.revision, o.commit);
            }
            out.push('\n');
        }
        if let Some(e) = &self.experts {
            let labels: Vec<&str> = self.inputs.iter().map(|i| i.label.as_str()).collect();
            out.push_str(&e.describe(&labels));
        }
        for sh in &self.shards {
            let _ = writeln!(out, "shard {} ({} bytes)", sh.file_name, sh.size);
            for (i, t) in self.tensors.iter().enumerate().take(sh.tensors.end).skip(sh.tensors.start) {
                if let Some(g) = self.groups.iter().find(|g| g.tensors.start == i) {
                    let n = g.tensors.len();
                    let _ = writeln!(
                        out,
                        "  {} {} {:?}: the {n} tensors below, in order",
                        g.name, t.dtype, g.shape
                    );
                }
                let indent = if self.groups.iter().any(|g| g.tensors.contains(&i)) { "    " } else { "  " };
                let fp8 = match self.requant.weights.get(&i) {
                    Some(Requantized::Fp8 { block: [m, n], pow2 }) => {
                        let pow2 = if *pow2 { ", power-of-two scales (ue8m0)" } else { "" };
                        format!(", quantized in {m}x{n} blocks{pow2}")
                    }
                    Some(Requantized::Mxfp4 { experts, cols, rows }) => {
                        format!(
                            ", quantized to MXFP4 from [{experts}, {cols}, {rows}], one E8M0 scale per 32"
                        )
                    }
                    None => String::new(),
                };
                let _ = writeln!(
                    out,
                    "{indent}{} {} {:?}: {}{fp8}",
                    t.name,
                    t.dtype,
                    t.shape,
                    self.describe_op(i)
                );
            }
        }
        let computed = self.tensors.iter().filter(|t| !matches!(t.op, Op::Copy(_))).count();
        let _ = writeln!(
            out,
            "total: {} tensors ({computed} computed), {} in {} shard(s); dry run, nothing written",
            self.tensors.len(),
            human_bytes(self.output_bytes()),
            self.shards.len()
        );
        out
    }

    fn describe_op(&self, tensor: usize) -> String {
        let name = |s: Source| {
            let t = self.input_tensor(s);
            let role = format!("{:?}", self.inputs[s.input].role).to_lowercase();
            match &t.stored_as {
                Some(at) => format!("{role}:{} (stored as {at})", t.name),
                None => format!("{role}:{}", t.name),
            }
        };
        // The tensor's scale; a sweep's candidates' as `a|b|c`.
        let scale = (0..self.variants())
            .map(|k| self.scale(k, tensor).map_or_else(String::new, |s| s.to_string()))
            .collect::<Vec<_>>()
            .join("|");
        match &self.tensors[tensor].op {
            Op::Copy(s) => format!("copy {}", name(*s)),
            Op::Convert(s) => format!("convert {}", name(*s)),
            Op::QuantScales(w) => match self.requant.weights.get(w) {
                Some(Requantized::Mxfp4 { .. }) => format!("MXFP4 scales of {}", self.tensors[*w].name),
                _ => format!("FP8 block scales of {}", self.tensors[*w].name),
            },
            Op::AddVectors(v) => {
                let mut f = name(v.base);
                for t in &v.terms {
                    let vector = match t.pre {
                        Some(pre) => format!("({} - {})", name(t.x), name(pre)),
                        None => name(t.x),
                    };
                    let _ = write!(f, " + {} * {vector}", t.scale);
                    if t.row_len > 1 {
                        let rows: u64 = t.runs.iter().map(|r| r.rows).sum();
                        let _ = write!(f, " on {rows} rows");
                    }
                }
                f
            }
            Op::Merge(m) => {
                let mut parts = Vec::new();
                if let Some(b) = m.base {
                    parts.push(format!("base={}", self.inputs[b.input].label));
                }
                for (s, mp) in m.models.iter().zip(&m.merge.params.models) {
                    let mut p = match m.merge.method {
                        Method::Passthrough => format!("{}(scale={}", self.inputs[s.input].label, mp.scale),
                        Method::NearSwap
                        | Method::Ram
                        | Method::RamPlusTl
                        | Method::Karcher
                        | Method::Sce
                        | Method::ArceeFusion => {
                            format!("{}(", self.inputs[s.input].label)
                        }
                        _ => format!("{}(weight={}", self.inputs[s.input].label, mp.weight),
                    };
                    if m.merge.method.sparsify().is_some() {
                        let _ = write!(p, ", density={}", mp.density);
                    }
                    p.push(')');
                    parts.push(p);
                }
                let q = &m.merge.params;
                let extra = match m.merge.method {
                    Method::Slerp => format!(" t={}", q.t),
                    Method::ModelStock => format!(" filter_wise={}", q.filter_wise),
                    Method::Linear => format!(" normalize={}", q.normalize),
                    Method::NearSwap => format!(" t={}", q.t),
                    Method::Passthrough => String::new(),
                    Method::Ram => format!(" epsilon={}", q.shared.epsilon),
                    Method::RamPlusTl => {
                        format!(" r={} alpha={} epsilon={}", q.shared.r, q.shared.alpha, q.shared.epsilon)
                    }
                    Method::NuSlerp => format!(
                        " nuslerp_flatten={} nuslerp_row_wise={}",
                        q.shared.flatten, q.shared.row_wise
                    ),
                    Method::MultiSlerp => {
                        format!(" normalize_weights={} eps={}", q.shared.normalize_weights, q.shared.eps)
                    }
                    Method::Karcher => format!(" max_iter={} tol={}", q.shared.max_iter, q.shared.tol),
                    Method::Sce => format!(" select_topk={}", q.shared.select_topk),
                    Method::ArceeFusion => String::new(),
                    _ => format!(" normalize={} rescale={} lambda={}", q.normalize, q.rescale, q.lambda),
                };
                format!("{} {}{extra}", m.merge.method.name(), parts.join(" "))
            }
            Op::Arith { formula, runs, row_len } => {
                let f = match *formula {
                    Formula::Diff { chat, pre } => format!("{} - {}", name(chat), name(pre)),
                    Formula::AddDiff { base, chat, pre } => {
                        format!("{} + {scale} * ({} - {})", name(base), name(chat), name(pre))
                    }
                    Formula::AddScaled { base, vector } => {
                        format!("{} + {scale} * {}", name(base), name(vector))
                    }
                    Formula::AddLowRank { base, a, b, transposed, .. } => {
                        let t = if transposed { "^T" } else { "" };
                        let rank = self.input_tensor(a).shape[0];
                        format!("{} + {scale} * ({} @ {}){t} (rank {rank})", name(base), name(b), name(a))
                    }
                };
                if *row_len > 1 {
                    let rows: u64 = runs.iter().map(|r| r.rows).sum();
                    format!("{f} on {rows} rows")
                } else {
                    f
                }
            }
        }
    }
}
