//! Recording every graph call's inputs (`t2i-rt run --record-inputs DIR`): the calibration data
//! `python -m t2i_export calibrate` collects from the real pipeline, every timestep and condition
//! included, for INT8 graphs.
//!
//! Layout: `DIR/<graph file>/<NNNNNN>/<input>.npy`, one folder per call of that graph (numbered
//! from 000000 in call order), holding every input as the graph saw it, bound ones included. A
//! call's folder is written under a temporary name and renamed when complete, so a reader never
//! sees half a call.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use ndarray::ArrayD;

use crate::backend::{Graph, GraphSession, OwnedTensor, TensorView};
use crate::error::{Error, Result};
use crate::manifest::RealTensor;

/// Checks that `dir` is a fresh place to record into (missing or empty), and creates it.
pub(crate) fn prepare(dir: &Path) -> Result<()> {
    let err = |message: String| Error::Io { path: dir.to_path_buf(), message };
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(err(
                    "is not empty; record each run into a new folder, so that calls of different runs never mix".into(),
                ));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))
        }
        Err(e) => Err(err(e.to_string())),
    }
}

/// A graph whose sessions write their inputs to `dir` before each run.
pub(crate) struct RecordingGraph {
    inner: Arc<dyn Graph>,
    dir: PathBuf,
    calls: Arc<AtomicUsize>,
}

impl RecordingGraph {
    /// Records `inner`'s calls under `root`, in a folder named after the graph's manifest `file`
    /// (`/` written as `__`).
    pub(crate) fn wrap(inner: Arc<dyn Graph>, root: &Path, file: &str) -> Arc<dyn Graph> {
        let dir = root.join(file.replace('/', "__"));
        Arc::new(RecordingGraph { inner, dir, calls: Arc::new(AtomicUsize::new(0)) })
    }
}

impl Graph for RecordingGraph {
    fn inputs(&self) -> &[RealTensor] {
        self.inner.inputs()
    }

    fn outputs(&self) -> &[RealTensor] {
        self.inner.outputs()
    }

    fn session(&self) -> Result<Box<dyn GraphSession>> {
        Ok(Box::new(RecordingSession {
            inner: self.inner.session()?,
            dir: self.dir.clone(),
            calls: self.calls.clone(),
            bound: Vec::new(),
        }))
    }
}

struct RecordingSession {
    inner: Box<dyn GraphSession>,
    dir: PathBuf,
    calls: Arc<AtomicUsize>,
    /// Copies of the bound inputs: a call's record holds them too.
    bound: Vec<(String, OwnedTensor)>,
}

impl RecordingSession {
    fn record(&self, inputs: &[(&str, TensorView<'_>)]) -> Result<()> {
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        let done = self.dir.join(format!("{call:06}"));
        let partial = self.dir.join(format!(".{call:06}.partial"));
        let err =
            |path: &Path, e: String| Error::Io { path: path.to_path_buf(), message: format!("recording inputs: {e}") };
        std::fs::create_dir_all(&partial).map_err(|e| err(&partial, e.to_string()))?;
        let bound = self.bound.iter().filter(|(name, _)| !inputs.iter().any(|(n, _)| n == name));
        let all = inputs.iter().map(|(n, v)| (*n, v.reborrow())).chain(bound.map(|(n, t)| (n.as_str(), t.view())));
        for (name, tensor) in all {
            let path = partial.join(format!("{}.npy", name.replace('/', "__")));
            let file = std::fs::File::create(&path).map_err(|e| err(&path, e.to_string()))?;
            let writer = std::io::BufWriter::new(file);
            let written = match tensor {
                TensorView::F32(a) => ndarray_npy::WriteNpyExt::write_npy(&a, writer),
                TensorView::I64(a) => ndarray_npy::WriteNpyExt::write_npy(&a, writer),
            };
            written.map_err(|e| err(&path, e.to_string()))?;
        }
        std::fs::rename(&partial, &done).map_err(|e| err(&done, e.to_string()))
    }
}

impl GraphSession for RecordingSession {
    fn run(&mut self, inputs: &[(&str, TensorView<'_>)]) -> Result<Vec<ArrayD<f32>>> {
        self.record(inputs)?;
        self.inner.run(inputs)
    }

    fn bind(&mut self, inputs: &[(&str, TensorView<'_>)]) -> Result<()> {
        self.inner.bind(inputs)?;
        for (name, view) in inputs {
            self.bound.retain(|(n, _)| n != name);
            self.bound.push((name.to_string(), OwnedTensor::from_view(view)));
        }
        Ok(())
    }

    fn unbind(&mut self) {
        self.inner.unbind();
        self.bound.clear();
    }
}
