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
