//! DPMSolverMultistepScheduler (diffusers `schedulers/scheduling_dpmsolver_multistep.py`): not
//! implemented yet (work in progress).

use super::{Scheduler, SchedulerConfig, SchedulerKind};
use crate::error::{Error, Result};

pub(crate) fn build(_config: &SchedulerConfig, _steps: usize, kind: SchedulerKind) -> Result<Box<dyn Scheduler>> {
    Err(Error::Scheduler { scheduler: kind.as_str(), message: "not implemented yet".into() })
}
