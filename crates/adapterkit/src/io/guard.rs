//! Readers from other crates (`tokenizers`' JSON, candle's PyTorch pickle) can panic on a
//! malformed file, or allocate what its header claims. Here their panics become errors, with
//! no panic message printed, and a pickle's claimed sizes are checked against the file before
//! candle reads it.

use std::cell::Cell;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Once;

use candle_core::pickle::PthTensors;
use candle_core::Tensor;

use crate::error::{Error, Result};

thread_local!(static QUIET: Cell<bool> = const { Cell::new(false) });
static QUIET_HOOK: Once = Once::new();

/// Runs `read`; a panic in it comes back as `Err` with its message. Panics elsewhere still
/// print as they always do.
pub fn guarded<T>(read: impl FnOnce() -> T) -> std::result::Result<T, String> {
    QUIET_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(Cell::get) {
                previous(info)
            }
        }));
    });
    QUIET.with(|q| q.set(true));
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(read));
    QUIET.with(|q| q.set(false));
    outcome.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "the reader failed".into())
    })
}

/// Opens a PyTorch `.bin` and checks that no string in its pickle and no tensor claims more
/// bytes than the file holds (candle allocates what the pickle claims).
pub fn open_pickle(path: &Path) -> Result<PthTensors> {
    let bad =
        |message: String| Error::file(path, format!("not a readable PyTorch file: {message}"));
    check_pickle_lengths(path).map_err(&bad)?;
    let pth = guarded(|| PthTensors::new(path, None))
        .map_err(&bad)?
        .map_err(|e| bad(crate::error::tensor_message(&e)))?;
    let file_bytes = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len() as usize;
    for info in pth.tensor_infos().values() {
        let elements = info
            .layout
            .start_offset()
            .checked_add(info.layout.shape().elem_count());
        let storage = info.storage_size.max(elements.unwrap_or(usize::MAX));
        let bytes = storage.checked_mul(info.dtype.size_in_bytes());
        if bytes.is_none_or(|b| b > file_bytes) {
            return Err(bad(format!(
                "tensor {} claims {storage} elements of {:?}, more than the file's {file_bytes} bytes hold",
                info.name, info.dtype
            )));
        }
    }
    Ok(pth)
}

/// Every tensor of a PyTorch `.bin`, read after [`open_pickle`]'s checks.
pub fn read_pickle(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let pth = open_pickle(path)?;
    let bad =
        |message: String| Error::file(path, format!("not a readable PyTorch file: {message}"));
    let mut names: Vec<&String> = pth.tensor_infos().keys().collect();
    names.sort();
    names
        .into_iter()
        .filter_map(|name| {
            let tensor = guarded(|| pth.get(name))
                .map_err(&bad)
                .and_then(|got| got.map_err(|e| bad(crate::error::tensor_message(&e))));
            tensor.transpose().map(|t| t.map(|t| (name.clone(), t)))
        })
        .collect()
}

/// Walks the opcodes of every `data.pkl` in the zip, with the argument sizes of the opcodes
/// candle reads, and refuses an argument longer than what is left of the pickle (a string's
/// length is what candle allocates). An opcode candle does not know ends the walk: candle
/// refuses it itself.
fn check_pickle_lengths(path: &Path) -> std::result::Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let file_bytes = file.metadata().map_err(|e| e.to_string())?.len();
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| e.to_string())?;
    for i in 0..zip.len() {
        let entry = zip.by_index(i).map_err(|e| e.to_string())?;
        let name = entry.name().map_err(|e| e.to_string())?.to_string();
        if !name.ends_with("data.pkl") {
            continue;
        }
        // Read no more than a compressed pickle could hold, whatever its header says.
        let mut pickle = Vec::new();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(entry, file_bytes.saturating_mul(1024)),
            &mut pickle,
        )
        .map_err(|e| e.to_string())?;
        let mut at = 0;
        while let Some(&op) = pickle.get(at) {
            at += 1;
            let rest = &pickle[at..];
            let argument = match op {
                b'.' => break, // STOP
                0x80 | b'q' | b'h' | b'K' => Some(1),
                b'M' => Some(2),
                b'r' | b'j' | b'J' => Some(4),
                b'G' => Some(8),
                0x8a => rest.first().map(|n| 1 + *n as usize),
                b'X' => rest
                    .get(..4)
                    .map(|b| 4 + u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize),
                b'c' => {
                    // Two lines: the module's and the class's names.
                    let first = rest.iter().position(|b| *b == b'\n');
                    let second = first.and_then(|f| rest[f + 1..].iter().position(|b| *b == b'\n'));
                    first.zip(second).map(|(f, s)| f + s + 2)
                }
                b')' | b'R' | b'(' | b't' | b'Q' | 0x85 | 0x86 | 0x87 | 0x88 | 0x89 | b'N'
                | b's' | b'u' | b'}' | b'd' | b'b' | 0x81 | b']' | b'a' | b'e' => Some(0),
                _ => break,
            };
            match argument {
                Some(n) if n <= rest.len() => at += n,
                _ => {
                    return Err(format!(
                        "opcode {op:#04x} at byte {} of {name} claims more than its {} bytes",
                        at - 1,
                        pickle.len()
                    ))
                }
            }
        }
    }
    Ok(())
}
