//! 24 simulated hours per environment under paused time, with a seeded
//! random fault schedule and random callers; see `support/simulation.rs`
//! for the invariants. A few seeds here; `cargo bench --bench long_run`
//! runs many (`LONG_RUN_SEEDS`).

#[path = "support/simulation.rs"]
mod simulation;

#[tokio::test(start_paused = true)]
async fn a_day_of_faults_and_callers_keeps_every_invariant() {
    for seed in [1, 2, 3, 4] {
        match simulation::run(seed, 24).await {
            Ok(summary) => println!("seed {seed}: {summary:?}"),
            Err(violation) => panic!("{violation} (rerun: seed {seed})"),
        }
    }
}
