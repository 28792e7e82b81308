//! Staged rollouts: the pure part. Which devices each stage reaches ([`selection`]), what an
//! operator asks for ([`spec`]), how a stage's figures are judged ([`gates`]), and the state
//! machine that decides ([`engine`]). No I/O here: the runner (`crate::rollout_runner`) reads
//! the facts, calls the engine, saves its state and carries out its actions.

pub mod engine;
pub mod gates;
pub mod selection;
pub mod spec;

pub use engine::{Action, Command, Outcome, Phase, RolloutState};
pub use gates::StageFigures;
pub use selection::StageSize;
pub use spec::{FailurePolicy, Gates, RolloutRequest, RolloutSpec};
