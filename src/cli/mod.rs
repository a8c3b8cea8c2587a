//! The command line: argument definitions (`args`), and the glue that runs
//! the library's entry points and prints their results. stdout carries
//! data only (reports, one JSON document with `--json`); progress, notes
//! and warnings go to stderr. The demo, the benchmark and the synthetic
//! checkpoints they generate live here too: they belong to the binary, not
//! the library. The benchmark and its Hub stand-in (an HTTP server) are
//! built only with `--features bench`, so the binary users install ships
//! neither.

mod args;
#[cfg(feature = "bench")]
pub(crate) mod bench;
mod demo;
#[cfg(feature = "bench")]
mod loopback_hub;
mod pipeline;
pub(crate) mod synth;

use std::io::Write;

pub(crate) use args::Cli;
use args::Command;
use chatvec::{Error, Result, Summary, ui};

/// Writes to stdout; a closed pipe (`chatvec inspect M | head`) is not an error.
pub(crate) fn out(text: &str) -> Result<()> {
    let mut so = std::io::stdout().lock();
    match so.write_all(text.as_bytes()).and_then(|_| so.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Error::Io { op: "writing", path: "<stdout>".into(), source: e }),
        Ok(()) => Ok(()),
    }
}

/// Writes `v` as one pretty JSON document on stdout.
pub(crate) fn json_out(v: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::Internal(format!("writing JSON: {e}")))?;
    out(&format!("{text}\n"))
}

/// Prints a job's summary: warnings and notes on stderr, then the plan
/// (dry run) or a one-line report; or the summary as JSON.
fn report(s: &Summary, json: bool) -> Result<()> {
    say(&s.warnings, &s.notes);
    if json {
        return json_out(s);
    }
    report_body(s)
}

/// Prints a sweep's candidates: the notes and warnings they share said
/// once, a dry run's plan (the same for every candidate but the scales)
/// once, and what each wrote.
fn report_sweep(candidates: &[chatvec::Candidate]) -> Result<()> {
    let once = |pick: fn(&Summary) -> &Vec<String>| {
        let mut seen = std::collections::HashSet::new();
        candidates.iter().flat_map(move |c| pick(&c.summary)).filter(move |m| seen.insert(*m))
    };
    say(once(|s| &s.warnings), once(|s| &s.notes));
    for (i, c) in candidates.iter().enumerate() {
        let mut s = c.summary.clone();
        if i > 0 {
            s.plan_text = None;
        }
        report_body(&s)?;
    }
    Ok(())
}

/// Prints warnings, then notes, on stderr.
fn say<'a>(warnings: impl IntoIterator<Item = &'a String>, notes: impl IntoIterator<Item = &'a String>) {
    for w in warnings {
        ui::warn(w);
    }
    for n in notes {
        ui::note(n);
    }
}

/// The plan (dry run) or the one-line report of what was written.
fn report_body(s: &Summary) -> Result<()> {
    if let Some(p) = &s.plan_text {
        out(p)?;
    }
    if let Some(o) = &s.output {
        ui::note(&format!(
            "wrote {o}: {} tensors ({} computed), {} bytes in {} shard(s), {:.1} s",
            s.tensors,
            s.computed_tensors,
            s.bytes,
            s.shards.len(),
            s.seconds
        ));
    }
    Ok(())
}

/// Prints an analysis (table or JSON); failed pair checks make it exit 1
/// after the report is shown.
fn analyzed(r: &chatvec::AnalyzeReport, json: bool) -> Result<()> {
    if json {
        json_out(r)?;
    } else {
        out(&r.to_string())?;
    }
    let errors = r.findings.iter().filter(|f| f.severity == "error").count();
    if errors > 0 {
        return Err(Error::Usage(format!(
            "the vector fails {errors} pair check(s); see the findings (it is not a chat model minus its own base)"
        )));
    }
    Ok(())
}

/// Runs a parsed command line.
pub(crate) fn run(cli: Cli) -> Result<()> {
    ui::set_quiet(cli.quiet);
    chatvec::catch_signals();
    if let Some(p) = cli.aliases {
        chatvec::set_aliases_file(p);
    }
    if cli.offline {
        chatvec::set_offline();
    }
    let json = cli.json;
    match cli.command {
        Command::Extract(a) => {
            let spec = a.params.validate()?;
            if a.params.lora.wanted() {
                let r = chatvec::extract_lora(&spec, &a.out.destination(), &a.out.run_options())?;
                say(&r.warnings, &r.notes);
                return if json { json_out(&r) } else { out(&r.to_string()) };
            }
            report(&chatvec::extract(&spec, &a.out.destination(), &a.out.run_options())?, json)
        }
        Command::Apply(a) => {
            report(&chatvec::apply(&a.params.validate()?, &a.out.destination(), &a.out.run_options())?, json)
        }
        Command::Analyze(a) => analyzed(&chatvec::analyze(&a.spec())?, json),
        Command::Download(a) => {
            let r = chatvec::download(&a.models, &a.include, a.dry_run)?;
            if json { json_out(&r) } else { out(&r.to_string()) }
        }
        Command::Eval(a) if a.list => out(&chatvec::bench_list()),
        Command::Eval(a) => {
            let r = chatvec::eval(&a)?;
            if json { json_out(&r) } else { out(&r.to_string()) }
        }
        Command::Sweep(a) => {
            if !a.apply.params.scale.is_empty() || a.apply.params.lora.is_some() {
                return Err(Error::Usage(
                    "sweep takes its scales from --scales, and chat vectors only (no --scale, no --lora)"
                        .into(),
                ));
            }
            let r = chatvec::sweep(
                &a.apply.params.validate()?,
                &a.scales.0,
                &a.apply.out.destination(),
                &a.apply.out.run_options(),
            )?;
            if json {
                return json_out(&r);
            }
            report_sweep(&r.candidates)?;
            out(&format!(
                "{} candidate(s) in {}: {}\n",
                r.candidates.len(),
                r.output,
                r.candidates.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", ")
            ))
        }
        Command::Merge(mut a) => {
            a.mergekit.apply(&mut a.how);
            if let Some((stages, dir)) = a.stages()? {
                let all = chatvec::merge_stages(
                    &stages,
                    a.seed,
                    &a.destination()?,
                    &dir,
                    !a.no_lazy,
                    &a.how.run_options(),
                )?;
                if json {
                    return json_out(&all);
                }
                for s in &all {
                    report(s, false)?;
                }
                return Ok(());
            }
            let recipe = a.recipe()?;
            report(&chatvec::merge(&recipe, a.seed, &a.destination()?, &a.how.run_options())?, json)
        }
        Command::Push(a) => {
            let r = chatvec::push(&chatvec::PushSpec {
                dir: a.dir,
                repo: a.repo,
                revision: a.revision,
                create: a.create,
                private: a.private,
                message: a.message,
                keep: a.keep,
                dry_run: a.dry_run,
            })?;
            if json { json_out(&r) } else { out(&r.to_string()) }
        }
        Command::Verify(a) => {
            let r = chatvec::verify(&a.dir, a.recipe.as_deref())?;
            if json {
                json_out(&r)?
            } else {
                out(&r.to_string())?
            }
            r.into_result()
        }
        Command::Sft(a) => {
            let job = chatvec::SftJob {
                model: a.model.clone(),
                output: a.output.clone(),
                force: a.force,
                dry_run: a.dry_run,
                options: a.options(),
            };
            let r = chatvec::sft(&job)?;
            if json {
                json_out(&r)?;
            } else if r.dry_run {
                out(&r.to_string())?;
            }
            match r.exit_code {
                0 => Ok(()),
                code => Err(Error::Trainer(code)),
            }
        }
        Command::Run(mut a) => {
            a.mergekit.apply(&mut a.how);
            pipeline::run(&a, json)
        }
        Command::Inspect(a) => {
            let r = chatvec::inspect(&a.model)?;
            if json { json_out(&r) } else { out(&r.to_string()) }
        }
        Command::List => {
            let c = chatvec::catalog()?;
            if json { json_out(&c) } else { out(&c.to_string()) }
        }
        Command::Demo(a) => demo::run(a.dir.as_deref(), a.keep, a.device, json),
        #[cfg(feature = "bench")]
        Command::Bench(a) => bench::run(&a, json),
    }
}
