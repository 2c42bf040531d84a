//! `--device cpu|cuda[:N]|auto`.

use candle_core::Device;

/// What `--device auto` picks: CUDA device 0 when llara was built with CUDA and it starts, else
/// the CPU; with the reason, in words.
pub fn auto() -> (Device, String) {
    if !candle_core::utils::cuda_is_available() {
        return (
            Device::Cpu,
            "cpu (this llara was built without CUDA; rebuild with `--features cuda` for a GPU)"
                .into(),
        );
    }
    match Device::new_cuda(0) {
        Ok(d) => (
            d,
            "cuda:0 (llara was built with CUDA and device 0 started)".into(),
        ),
        Err(e) => (
            Device::Cpu,
            format!("cpu (llara was built with CUDA but device 0 did not start: {e})"),
        ),
    }
}

/// Parses a device flag. `auto` is [`auto`]; it logs what it chose and why.
pub fn parse(spec: &str) -> Result<Device, String> {
    let s = spec.trim().to_ascii_lowercase();
    match s.as_str() {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            let (d, why) = auto();
            if d.is_cpu() && candle_core::utils::cuda_is_available() {
                tracing::warn!("--device auto: {why}");
            } else {
                tracing::info!("--device auto: {why}");
            }
            Ok(d)
        }
        _ => {
            let ordinal = match s.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse::<usize>().ok())
                    .ok_or_else(|| {
                        format!("--device {spec}: expected cpu, cuda, cuda:N or auto")
                    })?,
                None => {
                    return Err(format!(
                        "--device {spec}: expected cpu, cuda, cuda:N or auto"
                    ))
                }
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(format!(
                    "--device {spec}: this llara was built without CUDA (rebuild with `--features cuda`) or no GPU is present"
                ));
            }
            Device::new_cuda(ordinal).map_err(|e| format!("--device {spec}: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses() {
        assert!(super::parse("cpu").unwrap().is_cpu());
        assert!(super::parse("auto").is_ok());
        let (d, why) = super::auto();
        if !candle_core::utils::cuda_is_available() {
            assert!(d.is_cpu() && why.contains("without CUDA"), "{why}");
        } else {
            assert!(
                why.starts_with(if d.is_cpu() { "cpu" } else { "cuda:0" }),
                "{why}"
            );
        }
        assert!(super::parse("tpu").unwrap_err().contains("expected cpu"));
        if !candle_core::utils::cuda_is_available() {
            assert!(super::parse("cuda:0").unwrap_err().contains("without CUDA"));
        }
    }
}
