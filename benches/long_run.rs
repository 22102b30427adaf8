//! Many seeds of the 24-hour simulation (see tests/support/simulation.rs),
//! each on its own paused-time runtime. Run:
//! `LONG_RUN_SEEDS=200 cargo bench --bench long_run` (default 100 seeds).
//! Exits non-zero, naming the seed, on the first violated invariant.

#[path = "../tests/support/simulation.rs"]
mod simulation;

fn main() {
    let seeds: u64 = std::env::var("LONG_RUN_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let started = std::time::Instant::now();
    let (mut calls, mut rotations, mut requests) = (0, 0, 0);
    for seed in 1..=seeds {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        match runtime.block_on(simulation::run(seed, 24)) {
            Ok(summary) => {
                calls += summary.endpoint_calls;
                rotations += summary.rotations;
                requests += summary.caller_requests;
            }
            Err(violation) => {
                eprintln!("{violation}");
                std::process::exit(1);
            }
        }
    }
    println!(
        "long run: {seeds} seeds × 24 simulated hours × 2 environments, every invariant held: \
         {calls} endpoint calls, {rotations} rotations, {requests} caller requests ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
}
