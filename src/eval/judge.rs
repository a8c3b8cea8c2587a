//! The judge: any OpenAI-compatible chat-completions endpoint (OpenAI, a
//! judge served locally by vLLM or any server speaking the same API),
//! asked at temperature 0 with bounded concurrency, retried with growing
//! waits on a dropped connection, a 429 or a 5xx. Every judgment is kept
//! under the sha256 of (judge model, system and user messages, settings),
//! which hold the benchmark's prompt, the question, the reference and the
//! answer, so a rerun, an added candidate or a new judge pays only for
//! what is new, and an interrupted run resumes.

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use super::bench::{JudgeRequest, parse_score};
use crate::error::{Error, Result};

/// The judge's answer budget, as MT-Bench's judging gives it.
const MAX_TOKENS: u64 = 2048;

/// Tries per judgment: the first and five retries.
const ATTEMPTS: u32 = 6;

/// What the judge is and how it is reached.
#[derive(Clone, Debug)]
pub(crate) struct JudgeConfig {
    /// The API base (`http://localhost:8000/v1`), or the full
    /// `.../chat/completions` URL.
    pub url: String,
    pub model: String,
    /// The environment variable holding the key.
    pub key_env: String,
    /// Requests in flight at once.
    pub concurrency: usize,
}

/// A judge that answered the up-front check.
pub(crate) struct Judge {
    completions: String,
    model: String,
    key: Option<String>,
    concurrency: usize,
    agent: ureq::Agent,
    cache: Option<PathBuf>,
    /// Requests sent (not answered from the cache), for the report.
    pub sent: AtomicUsize,
}

/// Whether `url`'s host is this machine or a private network, where a
/// judge served without a key is normal.
fn local_host(url: &str) -> bool {
    let host = url.split("://").nth(1).unwrap_or(url).split(['/', ':']).next().unwrap_or("");
    host == "localhost"
        || host.starts_with("127.")
        || host.starts_with("10.")
        || host.starts_with("192.168.")
        || host == "[::1]"
        || host.ends_with(".local")
}

impl Judge {
    /// Checks the configuration and the endpoint (one request, before any
    /// model is loaded): the URL, the key where one is needed, and that the
    /// server answers and accepts the key.
    pub(crate) fn connect(cfg: &JudgeConfig, cache: Option<PathBuf>) -> Result<Judge> {
        let url = cfg.url.trim_end_matches('/');
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(Error::Usage(format!("--judge-url {url}: expected an http:// or https:// URL"))
                .with_hint(
                    "the API base, e.g. http://localhost:8000/v1 for vLLM or https://api.openai.com/v1",
                ));
        }
        if cfg.model.trim().is_empty() {
            return Err(Error::Usage("--judge-model: name the judge model (e.g. gpt-4o)".into()));
        }
        if cfg.concurrency == 0 {
            return Err(Error::Usage("--judge-concurrency must be at least 1".into()));
        }
        let base = url.strip_suffix("/chat/completions").unwrap_or(url).to_string();
        let key = std::env::var(&cfg.key_env).ok().map(|k| k.trim().to_string()).filter(|k| !k.is_empty());
        if key.is_none() && !local_host(&base) {
            return Err(Error::Usage(format!(
                "the judge at {base} needs an API key, and ${} is not set",
                cfg.key_env
            ))
            .with_hint(format!(
                "export {}=... (or name another variable with --judge-key-env)",
                cfg.key_env
            )));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_global(Some(Duration::from_secs(600)))
            .user_agent(concat!("chatvec/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        let judge = Judge {
            completions: format!("{base}/chat/completions"),
            model: cfg.model.clone(),
            key,
            concurrency: cfg.concurrency,
            agent,
            cache,
            sent: AtomicUsize::new(0),
        };
        judge.check(&base)?;
        Ok(judge)
    }

    /// One `GET {base}/models`: the server answers, and takes the key.
    fn check(&self, base: &str) -> Result<()> {
        let mut req = self.agent.get(&format!("{base}/models"));
        if let Some(k) = &self.key {
            req = req.header("Authorization", &format!("Bearer {k}"));
        }
        match req.call() {
            Err(e) => Err(Error::Usage(format!("the judge at {base} does not answer: {e}"))
                .with_hint("start the judge first (e.g. `vllm serve MODEL`), or check --judge-url")),
            Ok(r) if matches!(r.status().as_u16(), 401 | 403) => Err(Error::Usage(format!(
                "the judge at {base} refused the key (HTTP {})",
                r.status().as_u16()
            ))),
            // Some servers have no model list; any other answer is a server.
            Ok(_) => Ok(()),
        }
    }

    /// Where a judgment with this key is kept.
    fn cache_file(&self, key: &str) -> Option<PathBuf> {
        self.cache.as_ref().map(|d| d.join(format!("{key}.json")))
    }

    /// The key of one request: everything that decides the judgment.
    fn key(&self, r: &JudgeRequest) -> String {
        let text =
            json!({"model": self.model, "system": r.system, "user": r.user, "temperature": 0, "max_tokens": MAX_TOKENS})
                .to_string();
        crate::hash::sha256_hex(text.as_bytes())
    }

    /// Sends one request, retried; the judge's text.
    fn ask(&self, r: &JudgeRequest) -> Result<String> {
        let body = json!({
            "model": self.model,
            "messages": [{"role": "system", "content": r.system}, {"role": "user", "content": r.user}],
            "temperature": 0,
            "max_tokens": MAX_TOKENS,
        })
        .to_string();
        let mut wait = crate::resolve::hub_api::first_wait();
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                crate::interrupt::check()?;
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_secs(30));
            }
            self.sent.fetch_add(1, Ordering::Relaxed);
            let mut req = self.agent.post(&self.completions).header("Content-Type", "application/json");
            if let Some(k) = &self.key {
                req = req.header("Authorization", &format!("Bearer {k}"));
            }
            match req.send(body.as_bytes()) {
                Err(e) => last = format!("{e}"),
                Ok(mut resp) => {
                    let status = resp.status().as_u16();
                    let text =
                        resp.body_mut().with_config().limit(16 << 20).read_to_string().unwrap_or_default();
                    if status == 200 {
                        let v: Value = serde_json::from_str(&text).map_err(|e| {
                            Error::Usage(format!("the judge answered something that is not JSON ({e})"))
                        })?;
                        return v
                            .pointer("/choices/0/message/content")
                            .and_then(Value::as_str)
                            .map(str::to_string)
                            .ok_or_else(|| {
                                Error::Usage(format!(
                                    "the judge's answer has no choices[0].message.content: {}",
                                    crate::ui::escaped(&text, 200)
                                ))
                            });
                    }
                    last = format!("HTTP {status}: {}", crate::ui::escaped(&text, 200));
                    if status != 429 && status < 500 {
                        return Err(Error::Usage(format!(
                            "the judge at {} refused: {last}",
                            self.completions
                        )));
                    }
                }
            }
        }
        Err(Error::Network(format!("the judge at {} failed {ATTEMPTS} times: {last}", self.completions)))
    }

    /// Every request's judgment (the text), from the cache or the judge,
    /// `concurrency` at a time; a judgment is kept as soon as it comes, so
    /// a failure or an interrupt loses nothing already paid for.
    pub(crate) fn judge_all(
        &self,
        requests: &[JudgeRequest],
        progress: &(dyn Fn(usize, usize) + Sync),
    ) -> Result<Vec<String>> {
        let keys: Vec<String> = requests.iter().map(|r| self.key(r)).collect();
        let out: Vec<Mutex<Option<String>>> = keys
            .iter()
            .map(|k| {
                let kept = self
                    .cache_file(k)
                    .and_then(|p| crate::json::read_value(&p, 16 << 20).ok())
                    .and_then(|v| v["judgment"].as_str().map(str::to_string));
                Mutex::new(kept)
            })
            .collect();
        // Identical requests (two candidates that answered alike) are
        // asked once: the first stands for the rest.
        let mut seen = std::collections::HashMap::new();
        let todo: Vec<usize> = (0..requests.len())
            .filter(|&i| out[i].lock().is_ok_and(|o| o.is_none()))
            .filter(|&i| *seen.entry(keys[i].as_str()).or_insert(i) == i)
            .collect();
        let next = AtomicUsize::new(0);
        let done = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let first_error: Mutex<Option<Error>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..self.concurrency.min(todo.len()) {
                s.spawn(|| {
                    loop {
                        let n = next.fetch_add(1, Ordering::SeqCst);
                        if n >= todo.len() || failed.load(Ordering::SeqCst) {
                            return;
                        }
                        let i = todo[n];
                        match self.ask(&requests[i]) {
                            Ok(text) => {
                                if let Some(p) = self.cache_file(&keys[i])
                                    && let Some(dir) = p.parent()
                                    && std::fs::create_dir_all(dir).is_ok()
                                {
                                    let tmp =
                                        dir.join(format!(".{}-{:?}", keys[i], std::thread::current().id()));
                                    let body = json!({"model": self.model, "judgment": text}).to_string();
                                    if std::fs::write(&tmp, body).is_ok() {
                                        let _ = std::fs::rename(&tmp, &p);
                                    }
                                }
                                if let Ok(mut o) = out[i].lock() {
                                    *o = Some(text);
                                }
                                progress(done.fetch_add(1, Ordering::SeqCst) + 1, todo.len());
                            }
                            Err(e) => {
                                failed.store(true, Ordering::SeqCst);
                                if let Ok(mut f) = first_error.lock()
                                    && f.is_none()
                                {
                                    *f = Some(e);
                                }
                                return;
                            }
                        }
                    }
                });
            }
        });
        if let Some(e) = first_error.into_inner().ok().flatten() {
            return Err(e);
        }
        let answered: Vec<Option<String>> = out.into_iter().map(|m| m.into_inner().ok().flatten()).collect();
        (0..requests.len())
            .map(|i| {
                answered[i]
                    .clone()
                    .or_else(|| answered[seen[keys[i].as_str()]].clone())
                    .ok_or_else(|| Error::Internal("a judgment went missing".into()))
            })
            .collect()
    }
}

/// The score each judgment states; the first that states none (or one
/// out of range) is an error naming `label(i)` and what the judge wrote.
pub(crate) fn scores(
    requests: &[JudgeRequest],
    judgments: &[String],
    label: &dyn Fn(usize) -> String,
) -> Result<Vec<f64>> {
    requests
        .iter()
        .zip(judgments)
        .enumerate()
        .map(|(i, (r, text))| {
            parse_score(text, r.grammar, r.range).ok_or_else(|| {
                Error::Usage(format!(
                    "{}: the judge's answer states no grade from {} to {}: {}",
                    label(i),
                    r.range.0,
                    r.range.1,
                    crate::ui::escaped(&text.replace('\n', " "), 300)
                ))
                .with_hint("the judgment is kept; rerun to judge the rest, or use a judge model that follows the benchmark's format")
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_needed_only_off_this_machine_and_private_networks() {
        assert!(local_host("http://localhost:8000/v1"));
        assert!(local_host("http://127.0.0.1:9/v1"));
        assert!(local_host("http://10.1.2.3/v1"));
        assert!(!local_host("https://api.openai.com/v1"));
        let cfg = JudgeConfig {
            url: "https://api.example.invalid/v1".into(),
            model: "judge".into(),
            key_env: "CHATVEC_TEST_SURELY_UNSET_KEY".into(),
            concurrency: 4,
        };
        let e = Judge::connect(&cfg, None).err().unwrap();
        assert!(e.to_string().contains("$CHATVEC_TEST_SURELY_UNSET_KEY is not set"), "{e}");
        let e = Judge::connect(&JudgeConfig { url: "ftp://x".into(), ..cfg.clone() }, None).err().unwrap();
        assert!(e.to_string().contains("http://"), "{e}");
    }

    #[test]
    fn a_judge_that_does_not_answer_is_refused_up_front() {
        // A port nothing listens on: bound, then closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let cfg = JudgeConfig {
            url: format!("http://127.0.0.1:{port}/v1"),
            model: "judge".into(),
            key_env: "CHATVEC_TEST_SURELY_UNSET_KEY".into(),
            concurrency: 4,
        };
        let e = Judge::connect(&cfg, None).err().unwrap();
        assert!(e.to_string().contains("does not answer"), "{e}");
    }

    /// A stand-in judge on 127.0.0.1: answers `GET /v1/models`, and each
    /// completion after `delay` with `[[N]]`, N from the request's length,
    /// except the first `fail` completions (503). Counts completions
    /// asked and the most in flight at once.
    struct StandIn {
        port: u16,
        asked: std::sync::Arc<AtomicUsize>,
        peak: std::sync::Arc<AtomicUsize>,
    }

    fn stand_in(delay: Duration, fail: usize, reply: &'static str) -> StandIn {
        use std::io::{BufRead, BufReader, Read, Write};
        use std::sync::Arc;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (asked, peak, live) =
            (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (a, p) = (asked.clone(), peak.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let (a, p, live) = (a.clone(), p.clone(), live.clone());
                std::thread::spawn(move || {
                    let mut r = BufReader::new(stream.try_clone().unwrap());
                    let mut line = String::new();
                    r.read_line(&mut line).unwrap();
                    let mut len = 0usize;
                    loop {
                        let mut h = String::new();
                        r.read_line(&mut h).unwrap();
                        if h.trim().is_empty() {
                            break;
                        }
                        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0u8; len];
                    r.read_exact(&mut body).unwrap();
                    let (status, text) = if line.starts_with("GET") {
                        ("200 OK", "{\"data\": []}".to_string())
                    } else {
                        let n = a.fetch_add(1, Ordering::SeqCst);
                        let now = live.fetch_add(1, Ordering::SeqCst) + 1;
                        p.fetch_max(now, Ordering::SeqCst);
                        std::thread::sleep(delay);
                        live.fetch_sub(1, Ordering::SeqCst);
                        if n < fail {
                            ("503 Service Unavailable", String::new())
                        } else {
                            let grade = 1 + body.len() % 10;
                            let content = reply.replace("N", &grade.to_string());
                            (
                                "200 OK",
                                json!({"choices": [{"message": {"role": "assistant", "content": content}}]})
                                    .to_string(),
                            )
                        }
                    };
                    let _ = write!(
                        stream,
                        "HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{text}",
                        text.len()
                    );
                });
            }
        });
        StandIn { port, asked, peak }
    }

    fn requests(n: usize) -> Vec<JudgeRequest> {
        (0..n)
            .map(|i| JudgeRequest {
                system: "S".into(),
                user: format!("question {i} {}", "x".repeat(i)),
                range: (1.0, 10.0),
                grammar: super::super::bench::ScoreGrammar::DoubleBrackets,
            })
            .collect()
    }

    /// 80 judgments at concurrency 8 keep exactly 8 in flight; each grade
    /// is the stand-in's; identical requests are asked once; a second
    /// pass is answered from the cache without a request; 503s are
    /// retried.
    #[test]
    fn judgments_run_concurrently_are_kept_and_503s_are_retried() {
        let d = tempfile::tempdir().unwrap();
        let judge_at = stand_in(Duration::from_millis(50), 3, "Rating: [[N]]");
        let cfg = JudgeConfig {
            url: format!("http://127.0.0.1:{}/v1", judge_at.port),
            model: "judge".into(),
            key_env: "CHATVEC_TEST_SURELY_UNSET_KEY".into(),
            concurrency: 8,
        };
        let judge = Judge::connect(&cfg, Some(d.path().join("judge"))).unwrap();
        let mut rs = requests(80);
        rs.push(rs[0].clone());
        let texts = judge.judge_all(&rs, &|_, _| {}).unwrap();
        assert_eq!(
            judge_at.asked.load(Ordering::SeqCst),
            80 + 3,
            "each distinct request once, plus the retried 503s"
        );
        assert_eq!(judge_at.peak.load(Ordering::SeqCst), 8);
        let grades = scores(&rs, &texts, &|i| format!("#{i}")).unwrap();
        for (r, g) in rs.iter().zip(&grades) {
            // The stand-in grades by the request body's length, which the
            // body's JSON fixes: recomputed here from the same body.
            let body = json!({
                "model": "judge",
                "messages": [{"role": "system", "content": r.system}, {"role": "user", "content": r.user}],
                "temperature": 0,
                "max_tokens": MAX_TOKENS,
            })
            .to_string();
            assert_eq!(*g, (1 + body.len() % 10) as f64);
        }
        let again = Judge::connect(&cfg, Some(d.path().join("judge"))).unwrap();
        assert_eq!(again.judge_all(&rs, &|_, _| {}).unwrap(), texts);
        assert_eq!(again.sent.load(Ordering::SeqCst), 0);
        assert_eq!(judge_at.asked.load(Ordering::SeqCst), 83);
    }

    /// A judgment that states no grade is an error naming the question.
    #[test]
    fn a_judgment_without_a_grade_names_its_question() {
        let judge_at = stand_in(Duration::ZERO, 0, "I cannot grade this.");
        let cfg = JudgeConfig {
            url: format!("http://127.0.0.1:{}/v1", judge_at.port),
            model: "judge".into(),
            key_env: "CHATVEC_TEST_SURELY_UNSET_KEY".into(),
            concurrency: 2,
        };
        let judge = Judge::connect(&cfg, None).unwrap();
        let rs = requests(3);
        let texts = judge.judge_all(&rs, &|_, _| {}).unwrap();
        let e = scores(&rs, &texts, &|i| format!("ja-mt-bench question {} turn 1", 81 + i)).unwrap_err();
        assert!(
            e.to_string().contains("ja-mt-bench question 81 turn 1")
                && e.to_string().contains("I cannot grade"),
            "{e}"
        );
    }
}
