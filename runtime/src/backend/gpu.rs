//! What the GPU backends need to know about the machine before ONNX Runtime does: is there an NVIDIA
//! driver, which GPU is device N (for engine-cache keys and messages), and which TensorRT is
//! installed. Read straight from the driver (`libcuda.so.1`) and TensorRT (`libnvinfer.so.10`),
//! loaded at run time like ONNX Runtime itself, so the binary has no link-time CUDA dependency.

use std::ffi::{c_char, c_int, c_uint, CStr};

use libloading::{Library, Symbol};

const LIBCUDA: &str = "libcuda.so.1";
const LIBNVINFER: &str = "libnvinfer.so.10";
// CUdevice_attribute values (cuda.h).
const COMPUTE_CAPABILITY_MAJOR: c_int = 75;
const COMPUTE_CAPABILITY_MINOR: c_int = 76;

/// One GPU as the driver reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    pub name: String,
    /// Compute capability, e.g. (9, 0) for an H100.
    pub compute_capability: (i32, i32),
    /// `cuDriverGetVersion`, e.g. 13000 for CUDA 13.0.
    pub driver_version: i32,
    pub device_count: i32,
}

impl GpuInfo {
    /// `NVIDIA H100 80GB HBM3, sm_90, driver CUDA 13.0`: the form used in cache keys and messages.
    pub fn describe(&self) -> String {
        format!(
            "{}, sm_{}{}, driver CUDA {}.{}",
            self.name,
            self.compute_capability.0,
            self.compute_capability.1,
            self.driver_version / 1000,
            (self.driver_version % 1000) / 10
        )
    }
}

/// Asks the NVIDIA driver about GPU `device`. Errors say what is missing and what to do.
pub fn probe(device: u32) -> Result<GpuInfo, String> {
    // SAFETY: loading the NVIDIA driver library runs no initialisers that depend on our state.
    let lib = unsafe { Library::new(LIBCUDA) }.map_err(|e| {
        format!(
            "no NVIDIA driver on this machine ({LIBCUDA}: {e}); install the NVIDIA driver, or use --backend ort-cpu"
        )
    })?;
    type Init = unsafe extern "C" fn(c_uint) -> c_int;
    type Count = unsafe extern "C" fn(*mut c_int) -> c_int;
    type Get = unsafe extern "C" fn(*mut c_int, c_int) -> c_int;
    type Name = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int;
    type Attr = unsafe extern "C" fn(*mut c_int, c_int, c_int) -> c_int;
    type Version = unsafe extern "C" fn(*mut c_int) -> c_int;
    let symbol = |name: &[u8]| format!("{LIBCUDA} lacks {}", String::from_utf8_lossy(&name[..name.len() - 1]));
    // SAFETY: the signatures are the CUDA driver API's (cuda.h), stable since CUDA 2.
    unsafe {
        let init: Symbol<Init> = lib.get(b"cuInit\0").map_err(|_| symbol(b"cuInit\0"))?;
        let count: Symbol<Count> = lib.get(b"cuDeviceGetCount\0").map_err(|_| symbol(b"cuDeviceGetCount\0"))?;
        let get: Symbol<Get> = lib.get(b"cuDeviceGet\0").map_err(|_| symbol(b"cuDeviceGet\0"))?;
        let name: Symbol<Name> = lib.get(b"cuDeviceGetName\0").map_err(|_| symbol(b"cuDeviceGetName\0"))?;
        let attr: Symbol<Attr> = lib.get(b"cuDeviceGetAttribute\0").map_err(|_| symbol(b"cuDeviceGetAttribute\0"))?;
        let version: Symbol<Version> = lib.get(b"cuDriverGetVersion\0").map_err(|_| symbol(b"cuDriverGetVersion\0"))?;
        let status = init(0);
        if status != 0 {
            return Err(format!("the NVIDIA driver failed to initialise (cuInit error {status}); check `nvidia-smi`"));
        }
        let mut devices = 0;
        if count(&mut devices) != 0 || devices == 0 {
            return Err("the NVIDIA driver sees no GPU; check `nvidia-smi`".into());
        }
        if device as i64 >= i64::from(devices) {
            return Err(format!("--device {device}: this machine has {devices} GPU(s), numbered from 0"));
        }
        let mut handle = 0;
        if get(&mut handle, device as c_int) != 0 {
            return Err(format!("cannot open GPU {device}"));
        }
        let mut buf = [0 as c_char; 256];
        let gpu_name = if name(buf.as_mut_ptr(), buf.len() as c_int, handle) == 0 {
            CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned()
        } else {
            "unknown GPU".into()
        };
        let (mut major, mut minor, mut driver) = (0, 0, 0);
        attr(&mut major, COMPUTE_CAPABILITY_MAJOR, handle);
        attr(&mut minor, COMPUTE_CAPABILITY_MINOR, handle);
        version(&mut driver);
        Ok(GpuInfo {
            name: gpu_name,
            compute_capability: (major, minor),
            driver_version: driver,
            device_count: devices,
        })
    }
}

/// The installed TensorRT's version (`getInferLibVersion`), e.g. "10.13.3".
pub fn tensorrt_version() -> Result<String, String> {
    // SAFETY: loading TensorRT's library runs only its own static initialisers.
    let lib = unsafe { Library::new(LIBNVINFER) }.map_err(|e| {
        format!(
            "TensorRT 10 not found ({LIBNVINFER}: {e}); install it (e.g. `pip install tensorrt-cu13-libs` and add its \
             tensorrt_libs folder to LD_LIBRARY_PATH), or use --backend ort-cuda"
        )
    })?;
    type Version = unsafe extern "C" fn() -> c_int;
    // SAFETY: `int32_t getInferLibVersion()` (NvInferRuntime.h).
    let v = unsafe {
        let f: Symbol<Version> =
            lib.get(b"getInferLibVersion\0").map_err(|_| format!("{LIBNVINFER} lacks getInferLibVersion"))?;
        f()
    };
    // TensorRT 10 encodes MAJOR * 10000 + MINOR * 100 + PATCH.
    Ok(format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_is_readable() {
        let gpu = GpuInfo {
            name: "NVIDIA H100 80GB HBM3".into(),
            compute_capability: (9, 0),
            driver_version: 13000,
            device_count: 1,
        };
        assert_eq!(gpu.describe(), "NVIDIA H100 80GB HBM3, sm_90, driver CUDA 13.0");
    }

    #[test]
    fn a_machine_without_a_driver_gets_an_actionable_error() {
        // Holds on machines without a GPU (CI); on a GPU machine device 4095 does not exist.
        let err = probe(4095).unwrap_err();
        assert!(err.contains("NVIDIA driver") || err.contains("--device 4095"), "{err}");
    }
}
