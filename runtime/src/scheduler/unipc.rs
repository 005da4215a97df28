//! UniPCMultistepScheduler (diffusers `schedulers/scheduling_unipc_multistep.py`): not implemented yet (work in progress).

use super::{Scheduler, SchedulerConfig};
use crate::error::{Error, Result};

pub(crate) fn build(_config: &SchedulerConfig, _steps: usize) -> Result<Box<dyn Scheduler>> {
    Err(Error::Scheduler { scheduler: "unipc", message: "not implemented yet".into() })
}
