//! The tract backend: pure Rust, no shared library, the CPU fallback.
//!
//! tract optimizes a graph for concrete input shapes, so a loaded graph keeps one optimized plan per
//! set of input shapes it has seen (a request's shapes are fixed for all its steps), shared by all
//! sessions of that graph.
//!
//! tract's kernels run single-threaded unless given an executor; this backend gives every graph
//! call a rayon pool of `threads` (default: the machine's available parallelism, as ONNX Runtime
//! uses every core by default).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use ndarray::ArrayD;
use tract_linalg::multithread::{multithread_tract_scope, Executor};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

use super::{Backend, Graph, GraphSession, OwnedTensor, TensorView};
use crate::error::{Error, Result};
use crate::manifest::{DType, RealTensor};

const BACKEND: &str = "tract";

/// Runs graphs with tract-onnx.
#[derive(Debug, Clone)]
pub struct TractBackend {
    executor: Executor,
}

impl TractBackend {
    /// `threads` per graph call; `None` takes the machine's available parallelism.
    pub fn new(threads: Option<usize>) -> Self {
        let threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let executor = if threads > 1 { Executor::multithread(threads) } else { Executor::SingleThread };
        TractBackend { executor }
    }
}

impl Default for TractBackend {
    fn default() -> Self {
        TractBackend::new(None)
    }
}

impl Backend for TractBackend {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn load(&self, graph: &str, path: &Path) -> Result<Arc<dyn Graph>> {
        let what = path.display();
        let model = guarded(|| tract_onnx::onnx().model_for_path(path)).map_err(|e| load_error(graph, &what, e))?;
        guarded(|| self.graph(graph, model)).map_err(|e| load_error(graph, &what, e))
    }

    fn load_bytes(&self, graph: &str, bytes: &[u8]) -> Result<Arc<dyn Graph>> {
        let model = guarded(|| tract_onnx::onnx().model_for_read(&mut &bytes[..]))
            .map_err(|e| load_error(graph, &"the graph", e))?;
        guarded(|| self.graph(graph, model)).map_err(|e| load_error(graph, &"the graph", e))
    }
}

fn load_error(graph: &str, what: &dyn std::fmt::Display, e: TractError) -> Error {
    Error::Backend { backend: BACKEND, graph: graph.to_string(), message: format!("cannot load {what}: {e:#}") }
}

/// Runs `f`, turning a panic into an error. tract 0.23 panics on some malformed graphs instead of
/// returning an error (found by fuzzing: a node input naming no known value indexes a map), and a
/// bad graph must never take a service down. Sound to use after a panic: `f` owns or only reads
/// what it touches, and the plan cache is updated only with a finished plan.
fn guarded<T>(f: impl FnOnce() -> TractResult<T>) -> TractResult<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(anyhow::anyhow!(
            "tract failed on this graph ({message}); the graph is malformed or uses what tract does not support"
        ))
    })
}

impl TractBackend {
    fn graph(&self, graph: &str, model: InferenceModel) -> TractResult<Arc<dyn Graph>> {
        // Output types are only known after tract's type inference, which does not always succeed on
        // symbolic shapes (the residual inputs' dims are separate symbols); tract plans per concrete
        // shape anyway, so outputs are reported with an unknown type and checked when they arrive.
        let inputs = (0..model.inputs.len())
            .map(|i| {
                let name = model.node(model.inputs[i].node).name.clone();
                Ok(real_tensor(name, model.input_fact(i)?))
            })
            .collect::<TractResult<Vec<_>>>()?;
        let outputs = model
            .outputs
            .iter()
            .map(|&outlet| {
                let name = model
                    .outlet_label(outlet)
                    .map(str::to_string)
                    .unwrap_or_else(|| model.node(outlet.node).name.clone());
                Ok(real_tensor(name, model.outlet_fact(outlet)?))
            })
            .collect::<TractResult<Vec<_>>>()?;
        Ok(Arc::new(TractGraph(Arc::new(Inner {
            name: graph.to_string(),
            model,
            inputs,
            outputs,
            plans: Mutex::new(HashMap::new()),
            executor: self.executor.clone(),
        }))))
    }
}

struct TractGraph(Arc<Inner>);

type Plan = Arc<TypedRunnableModel>;

struct Inner {
    name: String,
    model: InferenceModel,
    inputs: Vec<RealTensor>,
    outputs: Vec<RealTensor>,
    /// Optimized plans keyed by the input shapes (in graph input order).
    plans: Mutex<HashMap<Vec<Vec<usize>>, Plan>>,
    /// The thread pool graph calls run on (shared by every graph of the backend).
    executor: Executor,
}

impl Graph for TractGraph {
    fn inputs(&self) -> &[RealTensor] {
        &self.0.inputs
    }

    fn outputs(&self) -> &[RealTensor] {
        &self.0.outputs
    }

    fn session(&self) -> Result<Box<dyn GraphSession>> {
        Ok(Box::new(TractSession { graph: self.0.clone(), bound: Vec::new() }))
    }
}

struct TractSession {
    graph: Arc<Inner>,
    /// Bound inputs: tract runs on the host, so binding only saves the caller passing them.
    bound: Vec<(String, OwnedTensor)>,
}

impl Inner {
    fn error(&self, message: String) -> Error {
        Error::Backend { backend: BACKEND, graph: self.name.clone(), message }
    }

    fn plan(&self, ordered: &[&TensorView<'_>]) -> Result<Plan> {
        let key: Vec<Vec<usize>> = ordered.iter().map(|t| t.shape().to_vec()).collect();
        if let Some(plan) = self.plans.lock().map_err(|_| self.error("plan cache poisoned".into()))?.get(&key) {
            return Ok(plan.clone());
        }
        let build = || -> TractResult<Plan> {
            let mut model = self.model.clone();
            for (i, input) in ordered.iter().enumerate() {
                let datum = match input {
                    TensorView::F32(_) => f32::datum_type(),
                    TensorView::I64(_) => i64::datum_type(),
                };
                model = model.with_input_fact(i, InferenceFact::dt_shape(datum, input.shape()))?;
            }
            model.into_optimized()?.into_runnable()
        };
        let plan = guarded(build).map_err(|e| self.error(format!("cannot prepare for input shapes {key:?}: {e:#}")))?;
        self.plans.lock().map_err(|_| self.error("plan cache poisoned".into()))?.insert(key, plan.clone());
        Ok(plan)
    }
}

impl GraphSession for TractSession {
    fn run(&mut self, inputs: &[(&str, TensorView<'_>)]) -> Result<Vec<ArrayD<f32>>> {
        let graph = &self.graph;
        let bound: Vec<(&str, TensorView<'_>)> = self.bound.iter().map(|(n, t)| (n.as_str(), t.view())).collect();
        let ordered = graph
            .inputs
            .iter()
            .map(|spec| {
                inputs
                    .iter()
                    .map(|(name, view)| (*name, view.reborrow()))
                    .chain(bound.iter().map(|(name, view)| (*name, view.reborrow())))
                    .find(|(name, _)| *name == spec.name)
                    .map(|(_, view)| view)
                    .ok_or_else(|| graph.error(format!("input {} was not given", spec.name)))
            })
            .collect::<Result<Vec<_>>>()?;
        let plan = graph.plan(&ordered.iter().collect::<Vec<_>>())?;
        let values: TVec<TValue> = ordered
            .iter()
            .map(|view| match view {
                TensorView::F32(a) => Tensor::from(a.to_owned()).into(),
                TensorView::I64(a) => Tensor::from(a.to_owned()).into(),
            })
            .collect();
        let outputs = guarded(|| multithread_tract_scope(graph.executor.clone(), || plan.run(values)))
            .map_err(|e| graph.error(format!("{e:#}")))?;
        outputs
            .iter()
            .map(|value| {
                value
                    .to_plain_array_view::<f32>()
                    .map(|a| a.to_owned())
                    .map_err(|e| graph.error(format!("output is not f32: {e:#}")))
            })
            .collect()
    }

    fn bind(&mut self, inputs: &[(&str, TensorView<'_>)]) -> Result<()> {
        for (name, view) in inputs {
            self.bound.retain(|(n, _)| n != name);
            self.bound.push((name.to_string(), OwnedTensor::from_view(view)));
        }
        Ok(())
    }

    fn unbind(&mut self) {
        self.bound.clear();
    }
}

/// The declared type and shape of an input or output, as far as the ONNX file fixes them.
fn real_tensor(name: String, fact: &InferenceFact) -> RealTensor {
    RealTensor {
        name,
        dtype: fact.datum_type.concretize().and_then(dtype_of),
        dims: (!fact.shape.is_open())
            .then(|| fact.shape.dims().map(|d| d.concretize().and_then(|d| d.to_i64().ok())).collect()),
    }
}

fn dtype_of(datum: DatumType) -> Option<DType> {
    match datum {
        DatumType::F32 => Some(DType::Float32),
        DatumType::F16 => Some(DType::Float16),
        DatumType::I64 => Some(DType::Int64),
        DatumType::I32 => Some(DType::Int32),
        _ => None,
    }
}
