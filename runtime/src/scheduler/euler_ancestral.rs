//! EulerAncestralDiscreteScheduler (diffusers `schedulers/scheduling_euler_ancestral_discrete.py`): not implemented yet (work in progress).

use super::{Scheduler, SchedulerConfig};
use crate::error::{Error, Result};

pub(crate) fn build(_config: &SchedulerConfig, _steps: usize) -> Result<Box<dyn Scheduler>> {
    Err(Error::Scheduler { scheduler: "euler_ancestral", message: "not implemented yet".into() })
}
