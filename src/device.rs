//! Device selection shared by every subcommand (`--device cpu|cuda:N|auto`).

use candle_core::Device;

/// Why a `--device` spec cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Not `cpu`, `cuda`, `cuda:N` or `auto`.
    #[error("unknown device {0:?}: expected `cpu`, `cuda`, `cuda:N` or `auto`")]
    Unknown(String),
    /// A CUDA device that this binary or machine cannot open.
    #[error("device {spec:?} is not available: {reason}")]
    Unavailable {
        /// The spec as given.
        spec: String,
        /// candle's error, or why CUDA is missing.
        reason: String,
    },
}

/// Parse a device string. `auto` picks CUDA device 0 when this binary was
/// built with the `cuda` feature and a GPU answers, else the CPU.
pub fn parse_device(spec: &str) -> Result<Device, DeviceError> {
    let s = spec.trim().to_ascii_lowercase();
    match s.as_str() {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(cuda(0).unwrap_or(Device::Cpu)),
        "cuda" | "gpu" => cuda(0),
        _ => {
            if let Some(n) = s.strip_prefix("cuda:") {
                let n: usize = n
                    .parse()
                    .map_err(|_| DeviceError::Unknown(spec.to_string()))?;
                cuda(n)
            } else {
                Err(DeviceError::Unknown(spec.to_string()))
            }
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda(n: usize) -> Result<Device, DeviceError> {
    // Device::new_cuda may panic without a driver; contain it.
    match std::panic::catch_unwind(|| Device::new_cuda(n)) {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => Err(DeviceError::Unavailable {
            spec: format!("cuda:{n}"),
            // candle appends a backtrace when RUST_BACKTRACE is set: keep
            // the message only.
            reason: e.to_string().lines().next().unwrap_or_default().to_string(),
        }),
        Err(_) => Err(DeviceError::Unavailable {
            spec: format!("cuda:{n}"),
            reason: "the CUDA driver could not be loaded".into(),
        }),
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda(n: usize) -> Result<Device, DeviceError> {
    Err(DeviceError::Unavailable {
        spec: format!("cuda:{n}"),
        reason: "this binary was built without the `cuda` feature (see README, GPU build)".into(),
    })
}

/// The device spec for one process of a data-parallel job with local rank
/// `local_rank`: `auto` becomes that rank's GPU, or the CPU where no GPU
/// answers at all (a rank whose own GPU is missing is an error, not a slow
/// rank); any other spec is kept.
pub fn spec_for_rank(spec: &str, local_rank: usize) -> Result<String, DeviceError> {
    if !spec.trim().eq_ignore_ascii_case("auto") {
        return Ok(spec.to_string());
    }
    match cuda(local_rank) {
        Ok(_) => Ok(format!("cuda:{local_rank}")),
        Err(e) => match parse_device("auto")? {
            Device::Cpu => Ok("cpu".into()),
            _ => Err(e),
        },
    }
}

/// The device of this process: `spec` as it is, or, in a data-parallel
/// job (`local_rank` from the job's environment), [`spec_for_rank`] of it.
pub fn for_job(spec: &str, local_rank: Option<usize>) -> Result<Device, DeviceError> {
    match local_rank {
        Some(r) => parse_device(&spec_for_rank(spec, r)?),
        None => parse_device(spec),
    }
}

/// A short stable name for logs and metadata.
pub fn device_name(d: &Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn parses() {
        assert!(matches!(parse_device("cpu"), Ok(Device::Cpu)));
        assert!(parse_device("auto").is_ok());
        assert_eq!(spec_for_rank("cpu", 3).unwrap(), "cpu");
        #[cfg(not(feature = "cuda"))]
        assert_eq!(spec_for_rank("auto", 3).unwrap(), "cpu");
        assert!(matches!(parse_device("tpu"), Err(DeviceError::Unknown(_))));
        assert!(matches!(
            parse_device("cuda:x"),
            Err(DeviceError::Unknown(_))
        ));
    }
}
