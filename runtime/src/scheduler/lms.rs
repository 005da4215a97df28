//! LMSDiscreteScheduler (diffusers `schedulers/scheduling_lms_discrete.py`): not implemented yet (work in progress).

use super::{Scheduler, SchedulerConfig};
use crate::error::{Error, Result};

pub(crate) fn build(_config: &SchedulerConfig, _steps: usize) -> Result<Box<dyn Scheduler>> {
    Err(Error::Scheduler { scheduler: "lms", message: "not implemented yet".into() })
}
