//! The one place a job's parameters are parsed and its device opened, so each method's handler
//! starts from typed parameters.

use serde::de::DeserializeOwned;

use crate::sched::{JobContext, JobError, JobHandler, JobOutput};

/// A job kind's handler over its typed parameters; [`Typed`] makes it a [`JobHandler`].
pub trait TypedHandler: Send + Sync + 'static {
    const KIND: &'static str;
    type Params: DeserializeOwned;

    fn run(
        &self,
        ctx: &JobContext,
        params: Self::Params,
        device: &candle_core::Device,
    ) -> Result<JobOutput, JobError>;
}

/// A [`TypedHandler`] registered with the scheduler: bad parameters fail the job at once
/// (another attempt would read the same JSON), and so does a device this build cannot open.
pub struct Typed<H>(pub H);

impl<H: TypedHandler> JobHandler for Typed<H> {
    fn kind(&self) -> &'static str {
        H::KIND
    }

    fn run(&self, ctx: &JobContext) -> Result<JobOutput, JobError> {
        let params: H::Params = serde_json::from_value(ctx.params.clone())
            .map_err(|e| JobError::fatal(format!("bad {} params: {e}", H::KIND)))?;
        let device = ctx.device.open().map_err(JobError::fatal)?;
        self.0.run(ctx, params, &device)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde::Deserialize;

    use super::*;
    use crate::queue::{JobState, MemoryQueue};
    use crate::sched::{run_study, CancelFlag, Registry, SchedConfig};

    #[derive(Deserialize)]
    struct SquareParams {
        x: u64,
    }

    /// A kind whose typed parameters decide its result.
    struct Square;

    impl TypedHandler for Square {
        const KIND: &'static str = "square";
        type Params = SquareParams;

        fn run(
            &self,
            _ctx: &JobContext,
            p: SquareParams,
            device: &candle_core::Device,
        ) -> Result<JobOutput, JobError> {
            assert!(device.is_cpu());
            Ok(JobOutput::Done(serde_json::json!({ "square": p.x * p.x })))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn typed_handlers_get_parsed_params_and_bad_params_fail_at_once() {
        let job = |name: &str, params: serde_json::Value| {
            let mut j = crate::plan::testing::job("square", name, &[]);
            j.params = params;
            j
        };
        let queue = MemoryQueue::new();
        let study = queue.add_study(
            &[
                job("good", serde_json::json!({ "x": 7 })),
                job("bad", serde_json::json!({ "x": "seven" })),
            ],
            3,
        );
        let mut registry = Registry::new();
        registry.register(Arc::new(Typed(Square)));
        let summary = run_study(
            queue.clone(),
            study,
            Arc::new(registry),
            SchedConfig {
                poll: std::time::Duration::from_millis(10),
                artifacts_dir: std::env::temp_dir(),
                ..SchedConfig::default()
            },
            CancelFlag::new(),
            Arc::new(crate::sched::progress::NoProgress),
        )
        .await
        .expect("run");
        assert_eq!((summary.completed, summary.failed), (1, 1));
        let jobs = queue.jobs(study);
        assert_eq!(jobs[0].result, Some(serde_json::json!({ "square": 49 })));
        assert_eq!(jobs[1].state, JobState::Failed);
        assert_eq!(jobs[1].attempts, 1, "bad parameters are not retried");
        let error = jobs[1].error.as_deref().unwrap_or_default();
        assert!(error.contains("bad square params"), "{error}");
    }
}
