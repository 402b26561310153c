//! `coreflect watch`: procdump's triggers on top of reflected dumps.
//!
//! The watcher runs in the warden (see [`crate::warden`]): Ctrl-C or SIGTERM cancels it
//! at a safe point. It samples each watched process every `--poll`, feeds the samples to
//! the triggers, and starts a reflected dump in a thread of its own for each firing (at
//! most `--clones` writing at once; a firing beyond that is skipped and logged). With
//! `--signal` it stays the target's tracer ([`coreflect::trace::Tracer`]) and takes every
//! dump itself, with the target held stopped, before delivering the signal.

pub mod args;
pub mod probe;

use crate::report::{bytes, esc, json_str, report_json};
use crate::ModeArg;
use args::{signal_name, Size, WatchArgs};
use coreflect::trace::{dump_held, Event, Exit, Tracer};
use coreflect::{DumpOptions, DumpReport, Error, Mode, Options, Pid};
use probe::{Kind, Probe, Sample, Trigger};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// Runs `coreflect watch`; returns the exit code.
pub fn run(a: &WatchArgs) -> i32 {
    if let Err(e) = validate(a) {
        eprintln!("coreflect: error: {e}");
        if a.json {
            println!("{{\"event\":\"error\",\"message\":{}}}", json_str(&e));
        }
        return 2;
    }
    crate::warden::run_guarded(|cancel| {
        let mut w = Watcher::new(a, cancel);
        w.run()
    })
}

fn validate(a: &WatchArgs) -> Result<(), String> {
    let pct = |s: &Option<Size>| matches!(s, Some(Size::Percent(_)));
    if !a.cgroup && (pct(&a.mem) || pct(&a.mem_below)) {
        return Err("a memory threshold in percent needs --cgroup (percent of memory.max)".into());
    }
    if !a.signal.is_empty() {
        if a.pgid {
            return Err("--signal watches one process; it cannot be combined with --pgid".into());
        }
        if matches!(a.mode, ModeArg::Reflect) {
            return Err(
                "--signal dumps are taken with the target held stopped by the watcher (suspend mode); drop --mode reflect"
                    .into(),
            );
        }
    }
    if a.pgid && a.wait {
        return Err("--wait waits for a NAME; it cannot be combined with --pgid".into());
    }
    let dir = a.dir.clone().unwrap_or_else(|| PathBuf::from("."));
    match std::fs::metadata(&dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(format!("-o {}: not a directory", dir.display())),
        Err(e) => {
            return Err(format!(
                "-o {}: {e}; create the directory first",
                dir.display()
            ))
        }
    }
    if a.poll < Duration::from_millis(10) {
        return Err("--poll must be at least 10ms".into());
    }
    Ok(())
}

/// How the watch ended.
enum End {
    Count,
    TargetExited(String),
    Cancelled,
    Failed(String),
}

/// Events on stdout (`--json`) or stderr, and the status line.
struct Out {
    json: bool,
    status_on: bool,
    status_shown: bool,
}

impl Out {
    fn clear_status(&mut self) {
        if self.status_shown {
            eprint!("\r\x1b[K");
            self.status_shown = false;
        }
    }
    fn event(&mut self, human: &str, json: String) {
        self.clear_status();
        if self.json {
            let mut o = std::io::stdout().lock();
            let _ = writeln!(o, "{json}");
            let _ = o.flush();
        } else {
            eprintln!("coreflect: {human}");
        }
    }
    fn status(&mut self, line: &str) {
        if self.status_on {
            eprint!("\r\x1b[K{line}");
            self.status_shown = true;
        }
    }
}

/// One watched process.
struct Watched {
    pid: Pid,
    comm: String,
    probe: Probe,
    triggers: Vec<Trigger>,
    mem_limit: Option<u64>,
    last: Option<Sample>,
}

/// A dump finished in a worker thread.
struct Done {
    pid: Pid,
    trigger: String,
    path: PathBuf,
    result: coreflect::Result<DumpReport>,
}

struct Watcher<'a> {
    a: &'a WatchArgs,
    cancel: Arc<AtomicBool>,
    out: Out,
    kinds: Vec<Kind>,
    dir: PathBuf,
    watched: Vec<Watched>,
    dumps: u32,
    writing: Vec<PathBuf>,
    workers: Vec<std::thread::JoinHandle<()>>,
    tx: mpsc::Sender<Done>,
    rx: mpsc::Receiver<Done>,
    started: Instant,
}

fn excluded() -> Vec<Pid> {
    vec![
        std::process::id() as Pid,
        std::os::unix::process::parent_id() as Pid,
    ]
}

impl<'a> Watcher<'a> {
    fn new(a: &'a WatchArgs, cancel: Arc<AtomicBool>) -> Watcher<'a> {
        let mut kinds = Vec::new();
        if let Some(p) = a.cpu {
            kinds.push(Kind::Cpu(p));
        }
        if let Some(p) = a.cpu_below {
            kinds.push(Kind::CpuBelow(p));
        }
        if let Some(s) = a.mem {
            kinds.push(Kind::Mem(s));
        }
        if let Some(s) = a.mem_below {
            kinds.push(Kind::MemBelow(s));
        }
        if let Some(n) = a.threads {
            kinds.push(Kind::Threads(n));
        }
        if let Some(n) = a.fds {
            kinds.push(Kind::Fds(n));
        }
        if a.timer || (kinds.is_empty() && a.signal.is_empty()) {
            kinds.push(Kind::Timer);
        }
        let (tx, rx) = mpsc::channel();
        Watcher {
            a,
            cancel,
            out: Out {
                json: a.json,
                status_on: !a.json && !a.quiet && std::io::stderr().is_terminal(),
                status_shown: false,
            },
            kinds,
            dir: a.dir.clone().unwrap_or_else(|| PathBuf::from(".")),
            watched: Vec::new(),
            dumps: 0,
            writing: Vec::new(),
            workers: Vec::new(),
            tx,
            rx,
            started: Instant::now(),
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Sleeps up to `d`, waking early on cancel or a finished dump.
    fn nap(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while !self.cancelled() {
            let now = Instant::now();
            if now >= end {
                break;
            }
            match self
                .rx
                .recv_timeout((end - now).min(Duration::from_millis(100)))
            {
                Ok(done) => self.finished(done),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
    }

    /// Resolves the target to pids (waiting with --wait).
    fn resolve(&mut self) -> Result<Vec<Pid>, End> {
        let a = self.a;
        let numeric = a.target.parse::<Pid>().ok().filter(|p| *p > 0);
        if a.pgid {
            let Some(pgid) = numeric else {
                return Err(End::Failed(format!(
                    "--pgid needs a process group id, not '{}'",
                    a.target
                )));
            };
            let m = probe::group_members(pgid, &excluded());
            if m.is_empty() {
                return Err(End::Failed(format!("no process in process group {pgid}")));
            }
            return Ok(m);
        }
        if let Some(pid) = numeric {
            if !a.wait {
                return Ok(vec![pid]);
            }
        }
        let mut announced = false;
        loop {
            let m = probe::find_by_name(&a.target, &excluded());
            match m.len() {
                1 => return Ok(vec![m[0].0]),
                0 if a.wait => {
                    if !announced {
                        self.out.event(
                            &format!("waiting for a process named '{}'", a.target),
                            format!("{{\"event\":\"wait\",\"name\":{}}}", json_str(&a.target)),
                        );
                        announced = true;
                    }
                    self.nap(a.poll);
                    if self.cancelled() {
                        return Err(End::Cancelled);
                    }
                }
                0 => {
                    return Err(End::Failed(format!(
                        "no process named '{}' (give a pid, or --wait for it to start)",
                        a.target
                    )))
                }
                _ => {
                    let list: Vec<String> =
                        m.iter().map(|(p, c)| format!("{p} ({})", esc(c))).collect();
                    return Err(End::Failed(format!(
                        "'{}' matches {} processes: {}; give one pid",
                        a.target,
                        m.len(),
                        list.join(", ")
                    )));
                }
            }
        }
    }

    fn add(&mut self, pid: Pid) -> Result<(), String> {
        let info = coreflect::snapshot::preflight(pid).map_err(|e| e.with_causes())?;
        let mut cpus = None;
        let mut mem_limit = None;
        if self.a.cgroup {
            let (dir, lim) = probe::cgroup_limits(pid)?;
            let needs_cpu = self.a.cpu.is_some() || self.a.cpu_below.is_some();
            let needs_mem = [self.a.mem, self.a.mem_below]
                .iter()
                .any(|s| matches!(s, Some(Size::Percent(_))));
            if needs_cpu && lim.cpus.is_none() {
                return Err(format!(
                    "--cgroup: pid {pid}'s cgroup {} has no CPU limit (cpu.max, or cpu.cfs_quota_us on cgroup v1), nor have its parents",
                    dir.display()
                ));
            }
            if needs_mem && lim.memory.is_none() {
                return Err(format!(
                    "--cgroup: pid {pid}'s cgroup {} has no memory limit (memory.max, or memory.limit_in_bytes on cgroup v1), nor have its parents",
                    dir.display()
                ));
            }
            cpus = lim.cpus;
            mem_limit = lim.memory;
        }
        let mut probe = Probe::new(pid, info.stat.start_time, cpus);
        let last = probe.sample();
        self.watched.push(Watched {
            pid,
            comm: info.stat.comm,
            probe,
            triggers: self.kinds.iter().map(|k| Trigger::new(*k)).collect(),
            mem_limit,
            last,
        });
        Ok(())
    }

    fn describe(&self) -> String {
        let mut t: Vec<String> = self
            .kinds
            .iter()
            .map(|k| match k {
                Kind::Cpu(p) => format!("cpu >= {p}%"),
                Kind::CpuBelow(p) => format!("cpu < {p}%"),
                Kind::Mem(s) => format!("rss >= {}", size_str(s)),
                Kind::MemBelow(s) => format!("rss < {}", size_str(s)),
                Kind::Threads(n) => format!("threads >= {n}"),
                Kind::Fds(n) => format!("fds >= {n}"),
                Kind::Timer => format!("every {}s", self.a.seconds),
            })
            .collect();
        if !self.a.signal.is_empty() {
            let s: Vec<String> = self.a.signal.iter().map(|s| signal_name(*s)).collect();
            t.push(format!("signal {}", s.join(",")));
        }
        t.join(", ")
    }

    fn run(&mut self) -> i32 {
        let end = match self.resolve() {
            Ok(pids) => {
                let mut err = None;
                for p in pids {
                    if let Err(e) = self.add(p) {
                        err = Some(e);
                        break;
                    }
                }
                match err {
                    Some(e) => End::Failed(e),
                    None => {
                        if self.a.signal.is_empty() {
                            self.poll_loop()
                        } else {
                            self.signal_loop()
                        }
                    }
                }
            }
            Err(e) => e,
        };
        self.finish(end)
    }

    /// The "watching" event, once the watch is in place (with --signal: traced).
    fn announce(&mut self) {
        let who: Vec<String> = self
            .watched
            .iter()
            .map(|w| format!("{} ({})", w.pid, esc(&w.comm)))
            .collect();
        let pids: Vec<String> = self.watched.iter().map(|w| w.pid.to_string()).collect();
        let msg = format!(
            "watching {}: {}; {} dump(s) to {}",
            who.join(", "),
            self.describe(),
            self.a.count,
            self.dir.display()
        );
        self.out.event(
            &msg,
            format!(
                "{{\"event\":\"watch\",\"pids\":[{}],\"triggers\":{},\"count\":{}}}",
                pids.join(","),
                json_str(&self.describe()),
                self.a.count
            ),
        );
    }

    fn finish(&mut self, end: End) -> i32 {
        // Wait for the dumps in flight (a cancel aborts them: no partial file is left).
        for w in std::mem::take(&mut self.workers) {
            let _ = w.join();
        }
        while let Ok(done) = self.rx.try_recv() {
            self.finished(done);
        }
        let (reason, detail, code) = match &end {
            End::Count => ("count", format!("{} dump(s) taken", self.dumps), 0),
            End::TargetExited(d) => ("target-exited", d.clone(), 0),
            End::Cancelled => ("cancelled", "cancelled".to_string(), 130),
            End::Failed(e) => ("error", e.clone(), 1),
        };
        let human = match &end {
            End::Count => format!("done: {} dump(s) taken", self.dumps),
            End::TargetExited(d) => format!("done: {d}; {} dump(s) taken", self.dumps),
            End::Cancelled => format!("cancelled; {} dump(s) taken", self.dumps),
            End::Failed(e) => format!("error: {e}"),
        };
        self.out.event(
            &human,
            format!(
                "{{\"event\":\"exit\",\"reason\":{},\"detail\":{},\"dumps\":{},\"seconds\":{:.1}}}",
                json_str(reason),
                json_str(&detail),
                self.dumps,
                self.started.elapsed().as_secs_f64()
            ),
        );
        code
    }

    fn status_line(&mut self) {
        if !self.out.status_on {
            return;
        }
        let mut parts = Vec::new();
        for w in &self.watched {
            if let Some(s) = &w.last {
                parts.push(format!(
                    "pid {} cpu {} rss {} threads {} fds {}",
                    w.pid,
                    s.cpu.map_or("-".into(), |c| format!("{c:.0}%")),
                    bytes(s.rss),
                    s.threads,
                    s.fds
                ));
            }
        }
        let line = format!(
            "{} | dumps {}/{}{}",
            parts.join("; "),
            self.dumps,
            self.a.count,
            if self.writing.is_empty() {
                String::new()
            } else {
                format!(", {} writing", self.writing.len())
            }
        );
        self.out.status(&line);
    }

    fn options(&self, mode: Mode) -> Options {
        Options {
            mode,
            stop_timeout: Duration::from_secs(2),
            max_pause: self.a.max_pause,
            cancel: Some(self.cancel.clone()),
            hook: crate::test_hook(self.cancel.clone()),
            write_path: Default::default(),
        }
    }

    fn skip(&mut self, pid: Pid, trigger: &str, reason: &str) {
        self.out.event(
            &format!("skipped the {trigger} trigger of pid {pid}: {reason}"),
            format!(
                "{{\"event\":\"skip\",\"pid\":{pid},\"trigger\":{},\"reason\":{}}}",
                json_str(trigger),
                json_str(reason)
            ),
        );
    }

    fn finished(&mut self, d: Done) {
        self.writing.retain(|p| *p != d.path);
        self.report(d.pid, &d.trigger, d.result);
    }

    fn report(&mut self, pid: Pid, trigger: &str, r: coreflect::Result<DumpReport>) {
        match r {
            Ok(rep) => {
                self.dumps += 1;
                let human = format!(
                    "[{trigger}] dumped pid {pid} to {} ({}, paused {:.2} ms, {} in {:.2} s){}",
                    rep.path.display(),
                    rep.mode.as_str(),
                    rep.pause.total_us as f64 / 1000.0,
                    bytes(rep.file_size),
                    rep.duration_ms as f64 / 1000.0,
                    rep.warnings
                        .iter()
                        .map(|w| format!("\n  warning: {w}"))
                        .collect::<String>()
                );
                self.out.event(
                    &human,
                    format!(
                        "{{\"event\":\"dump\",\"trigger\":{},\"report\":{}}}",
                        json_str(trigger),
                        report_json(&rep)
                    ),
                );
            }
            Err(Error::Cancelled) => {}
            Err(e @ Error::PauseTooLong { .. }) => self.skip(pid, trigger, &e.to_string()),
            Err(e) => self.out.event(
                &format!("[{trigger}] dump of pid {pid} failed: {}", e.with_causes()),
                format!(
                    "{{\"event\":\"error\",\"pid\":{pid},\"trigger\":{},\"message\":{}}}",
                    json_str(trigger),
                    json_str(&e.with_causes())
                ),
            ),
        }
    }

    /// Samples every watched process; returns the triggers that fired, as (index, kind).
    /// Processes that are gone are dropped (with --pgid new members are added).
    fn sample_all(&mut self) -> Vec<(usize, Kind)> {
        let now = Instant::now();
        let mut fired = Vec::new();
        let mut gone = Vec::new();
        for (i, w) in self.watched.iter_mut().enumerate() {
            match w.probe.sample() {
                Some(s) => {
                    w.last = Some(s);
                    for t in w.triggers.iter_mut() {
                        if t.feed(&s, w.mem_limit, self.a.seconds, now) {
                            fired.push((i, t.kind));
                        }
                    }
                }
                None => gone.push(i),
            }
        }
        if !gone.is_empty() {
            fired.retain(|(i, _)| !gone.contains(i));
            for &i in gone.iter().rev() {
                let w = self.watched.remove(i);
                if self.watched.len() + 1 > 1 || self.a.pgid {
                    self.out.event(
                        &format!("pid {} ({}) exited", w.pid, esc(&w.comm)),
                        format!("{{\"event\":\"gone\",\"pid\":{}}}", w.pid),
                    );
                }
                for f in fired.iter_mut() {
                    if f.0 > i {
                        f.0 -= 1;
                    }
                }
            }
        }
        if self.a.pgid {
            if let Ok(pgid) = self.a.target.parse::<Pid>() {
                for p in probe::group_members(pgid, &excluded()) {
                    if !self.watched.iter().any(|w| w.pid == p) && self.add(p).is_ok() {
                        let w = self.watched.last().unwrap();
                        let msg = format!(
                            "pid {} ({}) joined the group: watching it",
                            w.pid,
                            esc(&w.comm)
                        );
                        let js = format!("{{\"event\":\"joined\",\"pid\":{}}}", w.pid);
                        self.out.event(&msg, js);
                    }
                }
            }
        }
        fired
    }

    fn exit_detail(&self) -> String {
        if self.a.pgid {
            format!("process group {} has no process left", self.a.target)
        } else {
            "the target exited".to_string()
        }
    }

    /// Polling triggers, reflected dumps in worker threads.
    fn poll_loop(&mut self) -> End {
        let mode = match self.a.mode {
            ModeArg::Auto => Mode::Auto,
            ModeArg::Reflect => Mode::Reflect,
            ModeArg::Suspend => Mode::Suspend,
        };
        self.announce();
        loop {
            if self.cancelled() {
                return End::Cancelled;
            }
            let fired = self.sample_all();
            if self.watched.is_empty() {
                return End::TargetExited(self.exit_detail());
            }
            for (i, kind) in fired {
                let launched = self.dumps as usize + self.writing.len();
                if launched >= self.a.count as usize {
                    break;
                }
                let (pid, comm) = (self.watched[i].pid, self.watched[i].comm.clone());
                if self.writing.len() >= self.a.clones as usize {
                    let why = format!(
                        "{} dump(s) still writing (--clones {})",
                        self.writing.len(),
                        self.a.clones
                    );
                    self.skip(pid, kind.name(), &why);
                    continue;
                }
                let base = probe::base_name(&comm, kind.name(), pid);
                let ext = if self.a.compress.is_some() {
                    "core.zst"
                } else {
                    "core"
                };
                let path = probe::pick_path(&self.dir, &base, ext, self.a.overwrite, &self.writing);
                self.writing.push(path.clone());
                let opts = DumpOptions {
                    snapshot: self.options(mode),
                    output: path.clone(),
                    overwrite: self.a.overwrite,
                    filter: self.a.filter,
                    level: self.a.level.into(),
                    compress: self.a.compress,
                    stdout: false,
                };
                let tx = self.tx.clone();
                let trigger = kind.name().to_string();
                let h = std::thread::Builder::new()
                    .name("dump".into())
                    .spawn(move || {
                        let result = coreflect::dump(pid, &opts, &mut |_, _| true);
                        let _ = tx.send(Done {
                            pid,
                            trigger,
                            path,
                            result,
                        });
                    });
                match h {
                    Ok(h) => self.workers.push(h),
                    Err(e) => {
                        self.writing.pop();
                        return End::Failed(format!("starting a dump thread: {e}"));
                    }
                }
            }
            self.workers.retain(|w| !w.is_finished());
            self.status_line();
            if self.dumps >= self.a.count {
                return End::Count;
            }
            self.nap(self.a.poll);
            if self.dumps >= self.a.count {
                return End::Count;
            }
        }
    }

    /// `--signal`: the watcher is the target's tracer; every dump is taken here with the
    /// target held stopped, then the signal is delivered.
    fn signal_loop(&mut self) -> End {
        let pid = self.watched[0].pid;
        let comm = self.watched[0].comm.clone();
        let mut tracer = match Tracer::attach(pid, &self.a.signal) {
            Ok(t) => t,
            Err(e) => return End::Failed(e.with_causes()),
        };
        self.announce();
        let mut next_poll = Instant::now();
        let end = loop {
            if self.cancelled() {
                break End::Cancelled;
            }
            let now = Instant::now();
            let mut fired: Vec<(Option<Pid>, String)> = Vec::new();
            if now >= next_poll {
                next_poll = now + self.a.poll;
                for (_, k) in self.sample_all() {
                    fired.push((None, k.name().to_string()));
                }
                self.status_line();
            }
            if fired.is_empty() {
                let wait = next_poll
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(100));
                match tracer.next_event(wait) {
                    Ok(None) => continue,
                    Ok(Some(Event::Signal { tid, sig })) => {
                        if self.dumps >= self.a.count {
                            let _ = tracer.deliver(tid);
                            continue;
                        }
                        self.out.event(
                            &format!(
                                "thread {tid} of pid {pid} is about to receive {}",
                                signal_name(sig)
                            ),
                            format!(
                                "{{\"event\":\"signal\",\"pid\":{pid},\"tid\":{tid},\"signal\":{}}}",
                                json_str(&signal_name(sig))
                            ),
                        );
                        fired.push((Some(tid), "signal".into()));
                    }
                    Ok(Some(Event::Exited(st))) => break End::TargetExited(exit_text(st)),
                    // Nothing to act on (a later library's new event).
                    Ok(Some(_)) => continue,
                    Err(e) => break End::Failed(e.with_causes()),
                }
            }
            for (tid, trigger) in fired {
                if self.dumps >= self.a.count {
                    break;
                }
                let held = match tracer.stop_all(Duration::from_secs(2)) {
                    Ok(s) => s,
                    Err(Error::ProcessExited { .. }) => {
                        return self
                            .end_traced(tracer, End::TargetExited("the target exited".into()))
                    }
                    Err(e) => {
                        self.report(pid, &trigger, Err(e));
                        let _ = tracer.resume_all();
                        continue;
                    }
                };
                let base = probe::base_name(&comm, &trigger, pid);
                let path = probe::pick_path(&self.dir, &base, "core", self.a.overwrite, &[]);
                let opts = DumpOptions {
                    snapshot: self.options(Mode::Suspend),
                    output: path,
                    overwrite: self.a.overwrite,
                    filter: self.a.filter,
                    level: self.a.level.into(),
                    compress: None,
                    stdout: false,
                };
                let r = dump_held(&held, tid, &opts, &mut |_, _| true);
                let resumed = tracer.resume_all();
                self.report(pid, &trigger, r);
                if let Err(e) = resumed {
                    return self.end_traced(
                        tracer,
                        End::Failed(format!(
                            "resuming the target after the dump: {}",
                            e.with_causes()
                        )),
                    );
                }
            }
            if self.dumps >= self.a.count {
                break End::Count;
            }
        };
        self.end_traced(tracer, end)
    }

    fn end_traced(&mut self, mut tracer: Tracer, end: End) -> End {
        let r = tracer.detach_all();
        drop(tracer);
        match r {
            Err(e) if !matches!(end, End::TargetExited(_)) => {
                self.out.event(
                    &format!("detaching from the target: {}", e.with_causes()),
                    format!(
                        "{{\"event\":\"error\",\"message\":{}}}",
                        json_str(&format!("detaching from the target: {}", e.with_causes()))
                    ),
                );
                end
            }
            _ => end,
        }
    }
}

fn exit_text(st: Exit) -> String {
    match st {
        Exit::Code(c) => format!("the target exited with status {c}"),
        Exit::Signal(s) => format!("the target was killed by {}", signal_name(s)),
        _ => "the target exited".into(),
    }
}

fn size_str(s: &Size) -> String {
    match s {
        Size::Bytes(b) => bytes(*b),
        Size::Percent(p) => format!("{p}% of memory.max"),
    }
}
