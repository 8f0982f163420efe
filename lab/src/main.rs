//! The lab's command line.
//!
//! - `clan-lab demo CLAN`: a real deploy on a builder and a target, telling the guide's
//!   first-deploy story (strict host key checking stops the second hop; `accept-new` fixes it).
//! - `clan-lab bench CLAN [N…]`: deploys N machines (default 1 4 16) through one build host,
//!   with this tool and with the sequential commands a user would otherwise script, and a
//!   no-op re-deploy; prints wall times, ratios, ssh logins and the tool's peak memory.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use clan_lab::{HostSpec, Lab};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let usage = || {
        eprintln!(
            "usage: clan-lab demo CLAN_BINARY | clan-lab bench CLAN_BINARY [N...] | clan-lab bench-eval CLAN_BINARY MACHINE_NIX [N...]"
        );
        ExitCode::from(2)
    };
    let (Some(command), Some(clan)) = (args.get(1), args.get(2)) else {
        return usage();
    };
    if command == "measure" {
        return measure(&args[2..]);
    }
    let clan = Path::new(clan)
        .canonicalize()
        .expect("the clan binary exists")
        .display()
        .to_string();
    match command.as_str() {
        "demo" => demo(&clan),
        "bench-eval" => {
            let Some(machine) = args.get(3) else {
                return usage();
            };
            let sizes: Vec<usize> = if args.len() > 4 {
                args[4..]
                    .iter()
                    .map(|n| n.parse().expect("N is a number"))
                    .collect()
            } else {
                vec![1, 4, 16]
            };
            bench_eval(&clan, machine, &sizes)
        }
        "measure" => measure(&args[2..]),
        "bench-scale" => bench_scale(&clan),
        "bench" => {
            let sizes: Vec<usize> = if args.len() > 3 {
                args[3..]
                    .iter()
                    .map(|n| n.parse().expect("N is a number"))
                    .collect()
            } else {
                vec![1, 4, 16]
            };
            bench(&clan, &sizes)
        }
        _ => usage(),
    }
}

fn demo(clan: &str) -> ExitCode {
    let lab = Lab::start(&[HostSpec::new("builder"), HostSpec::new("target")]);
    let (builder, target) = (lab.ip("builder"), lab.ip("target"));
    println!(
        "Lab: workstation, builder at {builder}, target at {target} (real sshd and nix each)."
    );
    let flake = lab.write_flake(&format!(
        r#"{{
          inventory.machines.my-machine = {{
            deploy.targetHost = "root@{target}";
            deploy.buildHost  = "root@{builder}";
          }};
          machines.my-machine = system {{ }};
        }}"#
    ));
    let update = |extra: &[&str]| {
        let mut argv = vec![clan, "machines", "update", "my-machine"];
        argv.extend_from_slice(extra);
        println!("\n$ clan {}", argv[1..].join(" "));
        let out = lab.run_on_workstation(&flake, &argv);
        print!("{}", String::from_utf8_lossy(&out.stdout));
        print!("{}", String::from_utf8_lossy(&out.stderr));
        println!("(exit {})", out.status.code().unwrap_or(-1));
        out.status.success()
    };

    println!("\n# The plan, without running it:");
    update(&["--dry-run"]);
    println!("\n# First deploy: the builder has never seen the target's host key.");
    update(&[]);
    println!("\n# The fix the error names:");
    let ok = update(&["--host-key-check", "accept-new"]);

    let t = lab.host("target");
    println!("\n# What each host holds now:");
    println!(
        "target system profile -> {}",
        t.system_profile().unwrap_or("(unset)".into())
    );
    for line in t.switch_log() {
        println!("target ran switch-to-configuration: {line}");
    }
    if let Some(out) = t.system_profile() {
        println!(
            "builder store has it: {}",
            lab.host("builder").has_path(&out)
        );
        println!(
            "workstation store has it: {}",
            lab.host("workstation").has_path(&out)
        );
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Seconds the shared part of every system takes to build, and each machine's own part.
const SHARED_SECONDS: u32 = 2;
const OWN_SECONDS: u32 = 1;

/// A lab with one build host (4 builds at once) and `n` targets, and its flake.
fn bench_lab(n: usize) -> (Lab, std::path::PathBuf, Vec<String>) {
    let mut specs = vec![HostSpec::new("builder").max_jobs(4)];
    let names: Vec<String> = (1..=n).map(|i| format!("m{i}")).collect();
    specs.extend(names.iter().map(|m| HostSpec::new(m)));
    let lab = Lab::start(&specs);
    for m in &names {
        lab.trust("builder", m);
    }
    let inventory: String = names
        .iter()
        .map(|m| {
            format!(
                r#"{m} = {{ deploy.targetHost = "root@{}"; deploy.buildHost = "root@{}"; }};"#,
                lab.ip(m),
                lab.ip("builder")
            )
        })
        .collect();
    let machines: String = names
        .iter()
        .map(|m| format!("{m} = system {{ shared = true; buildSeconds = {OWN_SECONDS}; }};"))
        .collect();
    let flake = lab.write_flake_with_shared_seconds(
        &format!("{{ inventory.machines = {{ {inventory} }}; machines = {{ {machines} }}; }}"),
        SHARED_SECONDS,
    );
    (lab, flake, names)
}

/// Logins seen by `host`'s sshd, by source address.
fn logins(lab: &Lab, host: &str) -> BTreeMap<String, usize> {
    lab.host(host).logins_by_source()
}

struct Figures {
    n: usize,
    tool: f64,
    baseline: f64,
    noop: f64,
    peak_kib: u64,
    ws_to_builder: usize,
    ws_to_target_max: usize,
    builder_to_target_max: usize,
    baseline_ws_to_builder: usize,
    parallel: f64,
    parallel_noop: f64,
    build_jobs: f64,
    /// Lines clan printed for people (standard error, `--log-format plain`).
    plain_lines: usize,
    /// Terminal control sequences among them (none belong in a log).
    plain_escapes: usize,
}

/// Every step the runs' logs on the workstation record (each start is stamped `@EPOCH`), as
/// (when it started, the rest of its line), in order.
fn logged_steps(lab: &Lab) -> Vec<(f64, String)> {
    let logs = lab
        .host("workstation")
        .root()
        .join(".local/state/clan/logs");
    let mut steps: Vec<(f64, String)> = Vec::new();
    for run in std::fs::read_dir(&logs).expect("logs").flatten() {
        for file in std::fs::read_dir(run.path()).expect("run logs").flatten() {
            let text = std::fs::read_to_string(file.path()).unwrap_or_default();
            for line in text.lines() {
                if let Some((stamp, rest)) = line.strip_prefix('@').and_then(|l| l.split_once(' '))
                    && let Ok(t) = stamp.parse::<f64>()
                {
                    steps.push((t, rest.to_string()));
                }
            }
        }
    }
    steps.sort_by(|a, b| a.0.total_cmp(&b.0));
    steps
}

/// When the first logged step whose line contains `what` started (NaN if none did).
fn first_step(steps: &[(f64, String)], what: &str) -> f64 {
    steps
        .iter()
        .find(|(_, s)| s.contains(what))
        .map_or(f64::NAN, |(t, _)| *t)
}

/// Where the time of one machine's deploy goes, from the run's log (each step's start is
/// stamped `@EPOCH`) and the evaluation timed apart.
fn breakdown(lab: &Lab, started: f64, ended: f64, evaluate: f64) -> Vec<(&'static str, f64)> {
    let steps = logged_steps(lab);
    let at = |what: &str| first_step(&steps, what);
    let checks = at("checks: begin");
    let checked = at("checks: over");
    let copy_drv = at("copy derivations:");
    let mkdir = at("build: mkdir");
    let copy = at("copy to target:");
    let activate = at("activate: test -e");
    let confirm = at("activate: clan-activate confirm");
    vec![
        ("evaluate and plan, until the checks", checks - started),
        ("(the evaluation alone: a --dry-run, timed apart)", evaluate),
        ("checks: up to date, preflight", checked - checks),
        ("copy the derivations to the build host", mkdir - copy_drv),
        ("build (GC-root directory, realise)", copy - mkdir),
        ("copy build host → target", activate - copy),
        (
            "activate (verify, summary, lock, profile, switch)",
            confirm - activate,
        ),
        ("confirm over a fresh login, clean up", ended - confirm),
        ("total", ended - started),
    ]
}

/// When each kind of step started during a run, from its log: for each kind (stage and
/// command word), how many ran, the first and the last start, in seconds from `started`.
fn timeline(lab: &Lab, started: f64) -> Vec<(String, usize, f64, f64)> {
    let mut kinds: BTreeMap<String, (usize, f64, f64)> = BTreeMap::new();
    for (t, line) in logged_steps(lab) {
        // "[m1] copy to target: env … nix … copy …" → "copy to target: nix copy"
        let rest = line.split_once("] ").map_or(line.as_str(), |(_, r)| r);
        let Some((stage, command)) = rest.split_once(": ") else {
            continue;
        };
        let words: Vec<&str> = command
            .split_whitespace()
            .take_while(|w| !w.starts_with('('))
            .filter(|w| {
                !w.contains('=')
                    && *w != "env"
                    && !w.starts_with('-')
                    && !w.chars().all(|c| c.is_ascii_digit())
                    && !w.contains("/nix/store/")
                    && !w.starts_with("/tmp/")
            })
            .take(2)
            .collect();
        let key = format!("{stage}: {}", words.join(" "));
        let e = kinds.entry(key).or_insert((0, f64::MAX, 0.0));
        e.0 += 1;
        e.1 = e.1.min(t - started);
        e.2 = e.2.max(t - started);
    }
    let mut rows: Vec<_> = kinds
        .into_iter()
        .map(|(k, (n, first, last))| (k, n, first, last))
        .collect();
    rows.sort_by(|a, b| a.2.total_cmp(&b.2));
    rows
}

/// The machine's CPU time, busy and idle (all cores, in clock ticks), from `/proc/stat`.
fn cpu_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 7 {
        return (0, 0);
    }
    // user nice system idle iowait irq softirq
    (v[0] + v[1] + v[2] + v[5] + v[6], v[3] + v[4])
}

/// Samples how busy the machine's CPUs are (every lab host shares them) every 100 ms, from
/// [`CpuSampler::start`] until [`CpuSampler::stop`].
struct CpuSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(f64, u64, u64)>>,
}

impl CpuSampler {
    fn start() -> CpuSampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            loop {
                let (busy, idle) = cpu_ticks();
                samples.push((epoch(), busy, idle));
                if stopped.load(std::sync::atomic::Ordering::SeqCst) {
                    return samples;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        });
        CpuSampler { stop, thread }
    }

    /// The samples: (epoch seconds, busy ticks, idle ticks), cumulative.
    fn stop(self) -> Vec<(f64, u64, u64)> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.join().unwrap_or_default()
    }
}

/// CPU time busy between `from` and `to` (epoch seconds), from the samples inside that
/// window: (percent of all CPU time, core-seconds).
fn busy_between(samples: &[(f64, u64, u64)], from: f64, to: f64) -> (f64, f64) {
    let inside: Vec<_> = samples
        .iter()
        .filter(|(t, _, _)| *t >= from && *t <= to)
        .collect();
    let (Some(first), Some(last)) = (inside.first(), inside.last()) else {
        return (f64::NAN, f64::NAN);
    };
    let busy = last.1.saturating_sub(first.1) as f64;
    let idle = last.2.saturating_sub(first.2) as f64;
    // SAFETY: sysconf only reads a constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (100.0 * busy / (busy + idle).max(1.0), busy / ticks)
}

/// How busy the CPUs were during clan's run: before its build started, while only the build
/// ran (until the first system was copied to its target), and after.
struct Phases {
    /// Percent busy in each phase.
    percent: [f64; 3],
    /// Core-seconds of work before the build, and from the first copy on.
    before: f64,
    after: f64,
}

fn busy_by_phase(lab: &Lab, samples: &[(f64, u64, u64)], started: f64, ended: f64) -> Phases {
    let steps = logged_steps(lab);
    let at = |what: &str| first_step(&steps, what);
    let build = at("nix-store --realise");
    let copy = at("copy to target:");
    let before = busy_between(samples, started, build);
    let during = busy_between(samples, build, copy);
    let after = busy_between(samples, copy, ended);
    Phases {
        percent: [before.0, during.0, after.0],
        before: before.1,
        after: after.1,
    }
}

fn epoch() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

fn bench(clan: &str, sizes: &[usize]) -> ExitCode {
    let mut all = Vec::new();
    let mut stages = Vec::new();
    let mut steps = Vec::new();
    let mut steps_of = (0, 0.0);
    // CPU busy (%) during clan's largest run: before the build, during it, after; and over
    // all of clan's run and of the loop's.
    let mut busy = Phases {
        percent: [f64::NAN; 3],
        before: f64::NAN,
        after: f64::NAN,
    };
    let mut busy_overall = (f64::NAN, f64::NAN);
    let mut loop_of_largest = f64::NAN;
    for &n in sizes {
        eprintln!("N = {n}: this tool…");
        let (lab, flake, names) = bench_lab(n);
        // The evaluation alone (a dry run), once warm, for the breakdown.
        let _ = lab.run_on_workstation(&flake, &[clan, "machines", "update", "--dry-run"]);
        let dry = Instant::now();
        let _ = lab.run_on_workstation(&flake, &[clan, "machines", "update", "--dry-run"]);
        let evaluate = dry.elapsed().as_secs_f64();
        let epoch_started = epoch();
        let started = Instant::now();
        let sampler = CpuSampler::start();
        // CLAN_BENCH_ARGS: more arguments for this run (quick looks at one flag's effect).
        let extra = std::env::var("CLAN_BENCH_ARGS").unwrap_or_default();
        let mut argv = vec![
            clan,
            "machines",
            "update",
            "--json",
            "--log-format",
            "plain",
        ];
        argv.extend(extra.split_whitespace());
        let out = lab.run_on_workstation(&flake, &argv);
        let tool = started.elapsed().as_secs_f64();
        let samples = sampler.stop();
        assert!(
            out.status.success(),
            "deploy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if n == 1 {
            stages = breakdown(&lab, epoch_started, epoch_started + tool, evaluate);
        }
        if Some(&n) == sizes.iter().max() && n > 1 {
            steps = timeline(&lab, epoch_started);
            steps_of = (n, tool);
            busy = busy_by_phase(&lab, &samples, epoch_started, epoch_started + tool);
            busy_overall.0 = busy_between(&samples, epoch_started, epoch_started + tool).0;
        }
        let people = String::from_utf8_lossy(&out.stderr);
        let plain_lines = people.lines().count();
        let plain_escapes = people.matches('\x1b').count();
        if std::env::var_os("CLAN_BENCH_SHOW_OUTPUT").is_some() {
            eprintln!("--- clan's output, N = {n} ---\n{people}--- end ---");
            let logs = lab
                .host("workstation")
                .root()
                .join(".local/state/clan/logs");
            for run in std::fs::read_dir(&logs).expect("logs").flatten() {
                for file in std::fs::read_dir(run.path()).expect("run logs").flatten() {
                    let text = std::fs::read_to_string(file.path()).unwrap_or_default();
                    eprintln!("--- {} ---\n{text}", file.path().display());
                }
            }
        }
        let report: String = String::from_utf8_lossy(&out.stdout).into_owned();
        let peak_kib = report
            .split("\"peakRssKiB\":")
            .nth(1)
            .and_then(|r| {
                r.trim()
                    .split(|c: char| !c.is_ascii_digit())
                    .next()
                    .map(str::to_string)
            })
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let ws = lab.ip("workstation").to_string();
        let ws_to_builder = logins(&lab, "builder").get(&ws).copied().unwrap_or(0);
        let ws_to_target_max = names
            .iter()
            .map(|m| logins(&lab, m).get(&ws).copied().unwrap_or(0))
            .max()
            .unwrap_or(0);
        let builder_to_target_max = names
            .iter()
            .map(|m| logins(&lab, m).get(lab.ip("builder")).copied().unwrap_or(0))
            .max()
            .unwrap_or(0);
        for m in &names {
            assert!(lab.host(m).system_profile().is_some(), "{m} not deployed");
        }

        if std::env::var_os("CLAN_BENCH_ONLY_CLAN").is_some() {
            eprintln!("N = {n}: clan took {tool:.2} s, printed {plain_lines} lines");
            continue;
        }
        eprintln!("N = {n}: no-op re-deploy…");
        let started = Instant::now();
        let out = lab.run_on_workstation(
            &flake,
            &[clan, "machines", "update", "--log-format", "plain"],
        );
        let noop = started.elapsed().as_secs_f64();
        assert!(
            out.status.success(),
            "re-deploy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        drop(lab);

        eprintln!("N = {n}: sequential baseline…");
        let (lab, flake, names) = bench_lab(n);
        let script = baseline_script(&lab, &flake, &names);
        let started = Instant::now();
        let out = lab.run_on_workstation(&flake, &["bash", "-ec", &script]);
        let baseline = started.elapsed().as_secs_f64();
        assert!(
            out.status.success(),
            "baseline failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for m in &names {
            assert!(
                lab.host(m).system_profile().is_some(),
                "baseline did not deploy {m}"
            );
        }
        let baseline_ws_to_builder = logins(&lab, "builder")
            .get(lab.ip("workstation"))
            .copied()
            .unwrap_or(0);
        drop(lab);

        eprintln!("N = {n}: a parallel user loop (8 at a time)…");
        let (lab, flake, names) = bench_lab(n);
        let script = parallel_script(&lab, &flake, &names);
        // Untimed: the store's database and the flake's lock file made once, on the
        // workstation and on the build host, as a user's machines have them; eight Nix
        // processes creating them at once corrupt them or race on the store's first
        // symlinks (a lab artifact: without a nix-daemon, each process opens the store
        // itself).
        let _ = lab.run_on_workstation(
            &flake,
            &[
                "nix",
                "--extra-experimental-features",
                "nix-command flakes",
                "flake",
                "lock",
            ],
        );
        let builder = format!("root@{}", lab.ip("builder"));
        let _ = lab.run_on_workstation(
            &flake,
            &["ssh", &builder, "nix-store --gc --print-roots >/dev/null"],
        );
        let epoch_started = epoch();
        let started = Instant::now();
        let sampler = CpuSampler::start();
        let out = lab.run_on_workstation(&flake, &["bash", "-ec", &script]);
        let parallel = started.elapsed().as_secs_f64();
        let samples = sampler.stop();
        if Some(&n) == sizes.iter().max() && n > 1 {
            busy_overall.1 = busy_between(&samples, epoch_started, epoch_started + parallel).0;
            loop_of_largest = parallel;
        }
        assert!(
            out.status.success(),
            "parallel loop failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for m in &names {
            assert!(
                lab.host(m).system_profile().is_some(),
                "the parallel loop did not deploy {m}"
            );
        }
        let started = Instant::now();
        let out = lab.run_on_workstation(&flake, &["bash", "-ec", &script]);
        let parallel_noop = started.elapsed().as_secs_f64();
        assert!(out.status.success(), "parallel loop re-run failed");
        drop(lab);

        eprintln!("N = {n}: this tool with --build-jobs 8…");
        let (lab, flake, _) = bench_lab(n);
        let started = Instant::now();
        let out = lab.run_on_workstation(
            &flake,
            &[
                clan,
                "machines",
                "update",
                "--build-jobs",
                "8",
                "--log-format",
                "plain",
            ],
        );
        let build_jobs = started.elapsed().as_secs_f64();
        assert!(
            out.status.success(),
            "deploy with --build-jobs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        all.push(Figures {
            n,
            tool,
            baseline,
            noop,
            peak_kib,
            ws_to_builder,
            ws_to_target_max,
            builder_to_target_max,
            baseline_ws_to_builder,
            parallel,
            parallel_noop,
            build_jobs,
            plain_lines,
            plain_escapes,
        });
    }
    println!(
        "\n| N | clan (s) | sequential baseline (s) | parallel loop, 8 at once (s) | clan / parallel loop | clan --build-jobs 8 (s) | no-op: clan / loop (s) | ssh logins ws→builder (baseline) | max ws→target | max builder→target | clan peak RSS (MiB) | clan's output: lines (escapes) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for f in &all {
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} ({:.2}) | {:.1} / {:.1} | {} ({}) | {} | {} | {:.1} | {} ({}) |",
            f.n,
            f.tool,
            f.baseline,
            f.parallel,
            f.tool / f.parallel,
            f.build_jobs,
            f.build_jobs / f.parallel,
            f.noop,
            f.parallel_noop,
            f.ws_to_builder,
            f.baseline_ws_to_builder,
            f.ws_to_target_max,
            f.builder_to_target_max,
            f.peak_kib as f64 / 1024.0,
            f.plain_lines,
            f.plain_escapes
        );
    }
    println!(
        "\nEach system: a shared part ({SHARED_SECONDS} s to build) and its own part ({OWN_SECONDS} s); one build host with max-jobs = 4. The parallel loop runs {}.",
        if std::env::var_os("CLAN_BENCH_NIXOS_REBUILD").is_some() {
            "nixpkgs' nixos-rebuild switch --fast --flake … --build-host … --target-host … per machine"
        } else {
            "the sequential baseline's commands per machine (set CLAN_BENCH_NIXOS_REBUILD to nixpkgs' nixos-rebuild script to run it instead)"
        }
    );
    if !stages.is_empty() {
        println!("\nN = 1, where the time goes (clan, from its run log):\n");
        println!("| stage | seconds |");
        println!("|---|---|");
        for (stage, seconds) in &stages {
            println!("| {stage} | {seconds:.2} |");
        }
    }
    if !steps.is_empty() {
        println!(
            "\nN = {}, when each kind of step started (clan, from its run log; the run took {:.1} s):\n",
            steps_of.0, steps_of.1
        );
        println!("| step | count | first (s) | last (s) |");
        println!("|---|---|---|---|");
        for (step, count, first, last) in &steps {
            println!("| {step} | {count} | {first:.2} | {last:.2} |");
        }
        println!(
            "\nN = {}, how busy the CPUs were (all lab hosts share them): clan {:.0}% over its run \
             ({:.0}% before the build, {:.0}% while only the build ran, {:.0}% from the first copy \
             to a target on); the parallel loop {:.0}% over its run.",
            steps_of.0,
            busy_overall.0,
            busy.percent[0],
            busy.percent[1],
            busy.percent[2],
            busy_overall.1
        );
        // Pipelined checks: the first batch builds while the next ones are checked.
        let when = |key: &str, last: bool| {
            steps
                .iter()
                .find(|(step, ..)| step.starts_with(key))
                .map_or(f64::NAN, |(_, _, first, l)| if last { *l } else { *first })
        };
        println!(
            "Work before the first build: {:.1} core-seconds; from the first copy to a target \
             on: {:.1} core-seconds. The first build started at {:.2} s, while the last batch's \
             checks ended at {:.2} s; 0.8 × the parallel loop is {:.1} s.",
            busy.before,
            busy.after,
            when("build: nix-store", false),
            when("checks: over", true),
            0.8 * loop_of_largest
        );
    }
    ExitCode::SUCCESS
}

/// A user's `xargs -P 8` loop, 8 machines at a time, Nix's locks sharing what they build:
/// per machine, the package's `nixos-rebuild switch --fast --flake … --build-host …
/// --target-host …` when `CLAN_BENCH_NIXOS_REBUILD` names its script (see
/// [`nixos_rebuild`]), else the same commands as [`baseline_script`].
fn parallel_script(lab: &Lab, flake: &Path, names: &[String]) -> String {
    let dir = lab.dir.join("loop");
    std::fs::create_dir_all(&dir).expect("loop dir");
    let rebuild = nixos_rebuild(lab);
    for m in names {
        let one = match &rebuild {
            Some(script) => format!(
                "export NIX_SSHOPTS='-o StrictHostKeyChecking=yes'\n\
                 bash {script} switch --fast --flake '{flake}#{m}' --build-host root@{b} \
                 --target-host root@{t} >{dir}/{m}.log 2>&1 </dev/null || \
                 {{ cat {dir}/{m}.log >&2; exit 1; }}\n",
                script = script.display(),
                dir = dir.display(),
                flake = flake.display(),
                b = lab.ip("builder"),
                t = lab.ip(m),
            ),
            None => baseline_script(lab, flake, std::slice::from_ref(m)),
        };
        std::fs::write(dir.join(format!("{m}.sh")), one).expect("loop script");
    }
    format!(
        "ls {dir}/*.sh | xargs -P 8 -n 1 bash -e",
        dir = dir.display()
    )
}

/// nixpkgs' `nixos-rebuild` script, as its package installs it, when
/// `CLAN_BENCH_NIXOS_REBUILD` names it (nixpkgs is not reachable from the lab, so the bench
/// cannot fetch it): the package's placeholders become this machine's shell and Nix
/// (`@runtimeShell@`, `@path@`, `@nix@`); a copy from a built package keeps its store paths
/// and is run with `bash`, its PATH falling back to this machine's.
fn nixos_rebuild(lab: &Lab) -> Option<std::path::PathBuf> {
    let source = std::env::var_os("CLAN_BENCH_NIXOS_REBUILD")?;
    let text = std::fs::read_to_string(&source).expect("CLAN_BENCH_NIXOS_REBUILD is readable");
    let text = text
        .replace("@runtimeShell@", "/bin/bash")
        .replace("@path@", "/usr/bin:/bin")
        .replace("@nix@", "/usr");
    let script = lab.dir.join("nixos-rebuild");
    std::fs::write(&script, text).expect("nixos-rebuild copy");
    Some(script)
}

/// What a user would script without this tool: for each machine, one after the other,
/// evaluate, copy the derivations, build, copy build host → target, activate; every step a
/// fresh process and ssh connection.
fn baseline_script(lab: &Lab, flake: &Path, names: &[String]) -> String {
    let b = lab.ip("builder");
    let mut script = String::from("export NIX_SSHOPTS='-o StrictHostKeyChecking=yes'\n");
    for m in names {
        let t = lab.ip(m);
        script.push_str(&format!(
            r#"drv=$(nix eval --raw '{flake}#nixosConfigurations.{m}.config.system.build.toplevel.drvPath')
out=$(nix eval --raw '{flake}#nixosConfigurations.{m}.config.system.build.toplevel.outPath')
nix copy --derivation --to ssh://root@{b} "$drv"
ssh root@{b} nix-store --realise "$drv" >/dev/null
ssh root@{b} "NIX_SSHOPTS='-o StrictHostKeyChecking=yes' nix --extra-experimental-features nix-command copy --to ssh://root@{t} $out"
ssh root@{t} "nix-env -p /nix/var/nix/profiles/system --set $out && $out/bin/switch-to-configuration switch"
"#,
            flake = flake.display()
        ));
    }
    script
}

/// `clan-lab measure ARGV…`: runs ARGV, then prints `wall SECONDS maxrss KIB` on stderr:
/// the wall time and the peak resident memory of the largest process it ran (getrusage of
/// the waited-for descendants).
fn measure(argv: &[String]) -> ExitCode {
    let started = Instant::now();
    let status = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run");
    let wall = started.elapsed().as_secs_f64();
    // SAFETY: getrusage fills the struct it is given.
    let rss = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage.ru_maxrss
    };
    eprintln!(
        "wall {wall:.2} maxrss {rss} status {}",
        status.code().unwrap_or(-1)
    );
    if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs `argv` on the lab's workstation under `clan-lab measure`; (seconds, peak KiB).
fn measured(lab: &Lab, cwd: &Path, argv: &[&str]) -> (f64, u64) {
    let me = std::env::current_exe().expect("own path");
    let me = me.to_str().expect("utf-8 path");
    let mut all = vec![me, "measure"];
    all.extend_from_slice(argv);
    let out = lab.run_on_workstation(cwd, &all);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("wall "))
        .unwrap_or_else(|| panic!("no measurement: {stderr}"));
    assert!(out.status.success(), "{argv:?} failed: {stderr}");
    let words: Vec<&str> = line.split_whitespace().collect();
    (
        words[1].parse().expect("seconds"),
        words[3].parse().expect("KiB"),
    )
}

fn bench_eval(clan: &str, machine_nix: &str, sizes: &[usize]) -> ExitCode {
    let jobs = std::thread::available_parallelism().map_or(1, usize::from);
    let mut rows = Vec::new();
    for &n in sizes {
        let lab = Lab::start(&[HostSpec::new("target")]);
        let target = lab.ip("target").to_string();
        let names: Vec<String> = (1..=n).map(|i| format!("m{i}")).collect();
        let nix_file = lab.dir.join("synthetic-machine.nix");
        std::fs::copy(machine_nix, &nix_file).expect("copy the synthetic machine");
        let inventory: String = names
            .iter()
            .map(|m| format!(r#"{m}.deploy.targetHost = "root@{target}";"#))
            .collect();
        let machines: String = names
            .iter()
            .map(|m| format!(r#"{m} = import ./synthetic-machine.nix {{ name = "{m}"; }};"#))
            .collect();
        let flake = lab.write_flake(&format!(
            "{{ inventory.machines = {{ {inventory} }}; machines = {{ {machines} }}; }}"
        ));
        std::fs::copy(&nix_file, flake.join("synthetic-machine.nix")).expect("copy");
        // Warm up: lock the flake and copy its inputs once, outside the measurements.
        let _ = lab.run_on_workstation(
            &flake,
            &[
                "nix",
                "flake",
                "lock",
                "--extra-experimental-features",
                "nix-command flakes",
            ],
        );
        eprintln!("N = {n}: one nix eval for all machines…");
        let reference = format!("{}#clanInternals", flake.display());
        let (one_wall, one_rss) = measured(
            &lab,
            &flake,
            &[
                "nix",
                "--extra-experimental-features",
                "nix-command flakes",
                "eval",
                "--json",
                &reference,
                "--apply",
                "ci: builtins.mapAttrs (n: m: m.config.system.build.toplevel.drvPath) ci.machines",
            ],
        );
        eprintln!("N = {n}: this tool (--eval-jobs {jobs})…");
        let jobs_text = jobs.to_string();
        let (tool_wall, tool_rss) = measured(
            &lab,
            &flake,
            &[
                clan,
                "machines",
                "update",
                "--dry-run",
                "--eval-jobs",
                &jobs_text,
            ],
        );
        // A real deploy of all N to one target (it builds for itself): when did the first
        // build start, from the run's log timestamps, against the evaluation's end above?
        eprintln!("N = {n}: a real deploy, streaming…");
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        let out = lab.run_on_workstation(
            &flake,
            &[
                clan,
                "machines",
                "update",
                "--eval-jobs",
                &jobs_text,
                "--json",
                "--no-diff",
            ],
        );
        assert!(
            out.status.success(),
            "deploy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report = String::from_utf8_lossy(&out.stdout).into_owned();
        let log = report
            .split("\"log\": \"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .expect("a log path");
        let dir = lab.host(clan_lab::WORKSTATION).root().join(
            Path::new(log)
                .parent()
                .expect("dir")
                .strip_prefix("/root")
                .expect("in /root"),
        );
        let first_build = std::fs::read_dir(&dir)
            .expect("log dir")
            .flatten()
            .flat_map(|e| {
                std::fs::read_to_string(e.path())
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.starts_with('@') && l.contains("nix-store --realise"))
                    .filter_map(|l| l[1..].split_whitespace().next()?.parse::<f64>().ok())
                    .collect::<Vec<_>>()
            })
            .fold(f64::INFINITY, f64::min)
            - started;
        rows.push((n, one_wall, one_rss, tool_wall, tool_rss, first_build));
    }
    println!(
        "| N | one nix eval (s) | its peak RSS (MiB) | clan, {jobs} at once (s) | ratio | largest Nix process (MiB) | first build started (s) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (n, one_wall, one_rss, tool_wall, tool_rss, first_build) in rows {
        println!(
            "| {n} | {one_wall:.1} | {} | {tool_wall:.1} | {:.2} | {} | {first_build:.1} |",
            one_rss / 1024,
            tool_wall / one_wall,
            tool_rss / 1024
        );
    }
    ExitCode::SUCCESS
}

/// Closure size (NAR bytes) of `path` in host `name`'s store.
fn closure_bytes(lab: &Lab, name: &str, path: &str) -> u64 {
    let out = lab.exec(
        name,
        &[
            "nix",
            "--extra-experimental-features",
            "nix-command",
            "path-info",
            "-S",
            path,
        ],
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| {
                    let m = e.metadata().expect("metadata");
                    if m.is_dir() {
                        dir_bytes(&e.path())
                    } else {
                        m.len()
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

/// `clan-lab bench-scale CLAN`: (a) 16 targets through one build host, ssh copies vs a
/// binary cache: wall time and bytes the build host sends (ssh: each target's closure;
/// cache: what it uploads once); (b) 6 machines with a 2 s build each, the build host alone
/// vs with two Nix builders.
fn bench_scale(clan: &str) -> ExitCode {
    const N: usize = 16;
    let names: Vec<String> = (1..=N).map(|i| format!("m{i}")).collect();
    let run = |lab: &Lab, flake: &Path, extra: &[&str]| -> f64 {
        let mut argv = vec![clan, "machines", "update", "--log-format", "plain"];
        argv.extend_from_slice(extra);
        let started = Instant::now();
        let out = lab.run_on_workstation(flake, &argv);
        assert!(
            out.status.success(),
            "deploy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        started.elapsed().as_secs_f64()
    };
    let fleet = |lab: &Lab, cache: Option<(&str, &str)>| {
        let inventory: String = names
            .iter()
            .map(|m| {
                let cache = cache
                    .map(|(url, key)| {
                        format!(
                            r#"copyMode = "cache"; cache = {{ upload = "file:///root/cache"; url = "{url}"; publicKey = "{key}"; }};"#
                        )
                    })
                    .unwrap_or_default();
                format!(
                    r#"{m}.deploy = {{ targetHost = "root@{}"; buildHost = "root@{}"; {cache} }};"#,
                    lab.ip(m),
                    lab.ip("builder")
                )
            })
            .collect();
        let machines: String = names
            .iter()
            .map(|m| {
                format!(
                    "{m} = system {{ shared = true; packages = [ \"tool-1.0\" \"lib-2.3\" ]; }};"
                )
            })
            .collect();
        lab.write_flake(&format!(
            "{{ inventory.machines = {{ {inventory} }}; machines = {{ {machines} }}; }}"
        ))
    };
    let mut specs = vec![HostSpec::new("builder").max_jobs(4)];
    specs.extend(names.iter().map(|m| HostSpec::new(m)));

    eprintln!("(a) ssh mode, {N} targets…");
    let lab = Lab::start(&specs);
    for m in &names {
        lab.trust("builder", m);
    }
    let flake = fleet(&lab, None);
    let ssh_wall = run(&lab, &flake, &[]);
    let ssh_bytes: u64 = names
        .iter()
        .map(|m| {
            let out = lab.host(m).system_profile().expect("deployed");
            closure_bytes(&lab, m, &out)
        })
        .sum();
    drop(lab);

    eprintln!("(a) cache mode, {N} targets…");
    let mut lab = Lab::start(&specs);
    let plain = fleet(&lab, None);
    let setup = lab.run_on_workstation(
        &plain,
        &[
            clan,
            "machines",
            "setup-cache",
            "m1",
            "--upload",
            "file:///root/cache",
        ],
    );
    let key = String::from_utf8_lossy(&setup.stdout).trim().to_string();
    let url = lab.serve_http(&lab.host("builder").root().join("cache"));
    for m in &names {
        lab.append_nix_conf(m, &format!("trusted-public-keys = {key}"));
    }
    let flake = fleet(&lab, Some((&url, &key)));
    let cache_wall = run(&lab, &flake, &[]);
    let cache_bytes = dir_bytes(&lab.host("builder").root().join("cache"));
    drop(lab);

    eprintln!("(b) 6 machines with a 2 s build each: the build host alone, then with 2 builders…");
    let six: Vec<String> = (1..=6).map(|i| format!("m{i}")).collect();
    let mut specs = vec![
        HostSpec::new("builder"),
        HostSpec::new("b1"),
        HostSpec::new("b2"),
    ];
    specs.extend(six.iter().map(|m| HostSpec::new(m)));
    let builds = |lab: &Lab, builders: Option<&str>| {
        let inventory: String = six
            .iter()
            .map(|m| {
                let b = builders
                    .map(|b| format!(r#"builders = "{b}";"#))
                    .unwrap_or_default();
                format!(
                    r#"{m}.deploy = {{ targetHost = "root@{}"; buildHost = "root@{}"; {b} }};"#,
                    lab.ip(m),
                    lab.ip("builder")
                )
            })
            .collect();
        let machines: String = six
            .iter()
            .map(|m| format!("{m} = system {{ buildSeconds = 2; }};"))
            .collect();
        lab.write_flake(&format!(
            "{{ inventory.machines = {{ {inventory} }}; machines = {{ {machines} }}; }}"
        ))
    };
    let lab = Lab::start(&specs);
    for m in six.iter().map(String::as_str).chain(["b1", "b2"]) {
        lab.trust("builder", m);
    }
    let flake = builds(&lab, None);
    let alone = run(&lab, &flake, &[]);
    drop(lab);
    let lab = Lab::start(&specs);
    for m in six.iter().map(String::as_str).chain(["b1", "b2"]) {
        lab.trust("builder", m);
    }
    let spec = format!(
        "ssh://root@{} x86_64-linux ; ssh://root@{} x86_64-linux",
        lab.ip("b1"),
        lab.ip("b2")
    );
    let flake = builds(&lab, Some(&spec));
    let with_builders = run(&lab, &flake, &[]);
    drop(lab);

    println!("| {N} targets | wall (s) | bytes sent by the build host |");
    println!("|---|---|---|");
    println!(
        "| ssh copies | {ssh_wall:.1} | {} KiB (each target's closure) |",
        ssh_bytes / 1024
    );
    println!(
        "| binary cache | {cache_wall:.1} | {} KiB (uploaded once) |",
        cache_bytes / 1024
    );
    println!();
    println!("| 6 machines, 2 s build each | wall (s) |");
    println!("|---|---|");
    println!("| build host alone (max-jobs 1) | {alone:.1} |");
    println!("| build host + 2 Nix builders | {with_builders:.1} |");
    ExitCode::SUCCESS
}
