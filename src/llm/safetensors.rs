//! Hugging Face safetensors weights (one file or shards) read one tensor at a time from a memory
//! map: each tensor is copied out in its stored dtype when the loader asks for it, and the pages of
//! the map it came from are given back at once (`MADV_DONTNEED`), so the file's pages never count
//! towards the process's resident memory beside the weights made of them.

use super::llama::WeightSource;
use candle_core::safetensors::Load;
use candle_core::{Device, Result, Tensor};
use memmap2::{Mmap, UncheckedAdvice};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::PathBuf;

pub struct Streamed {
    files: Vec<(PathBuf, Mmap)>,
    /// Tensor name → index into `files`.
    index: HashMap<String, usize>,
}

impl Streamed {
    /// Maps every file and reads their headers; the error names the file.
    pub fn open(paths: &[PathBuf]) -> std::result::Result<Self, (PathBuf, String)> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for p in paths {
            let f = std::fs::File::open(p).map_err(|e| (p.clone(), e.to_string()))?;
            // SAFETY: the map is read only; a file changed under a running process is outside
            // what any memory-mapped reader (candle's, PyTorch's) can guard against.
            let m = unsafe { Mmap::map(&f) }.map_err(|e| (p.clone(), e.to_string()))?;
            let st = SafeTensors::deserialize(&m)
                .map_err(|e| (p.clone(), format!("not a readable safetensors file: {e}")))?;
            for name in st.names() {
                index.insert(name.to_string(), files.len());
            }
            drop(st);
            files.push((p.clone(), m));
        }
        Ok(Self { files, index })
    }
}

impl WeightSource for Streamed {
    fn tensor(&self, name: &str) -> Result<Option<Tensor>> {
        let Some(&f) = self.index.get(name) else {
            return Ok(None);
        };
        let (path, map) = &self.files[f];
        let st = SafeTensors::deserialize(map)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        let view = st
            .tensor(name)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {name}: {e}", path.display())))?;
        let t = view.load(&Device::Cpu)?;
        // Give the map's pages of this tensor back (whole pages inside its byte range).
        let start = view.data().as_ptr() as usize - map.as_ptr() as usize;
        let page = 4096;
        let (a, b) = (
            start.div_ceil(page) * page,
            (start + view.data().len()) / page * page,
        );
        if b > a {
            // SAFETY: the range lies inside the map, and nothing borrows these bytes any more
            // (the tensor was copied out); on a read-only file map the pages are simply re-read
            // from the file if touched again.
            let _ = unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, a, b - a) };
        }
        Ok(Some(t))
    }
}
