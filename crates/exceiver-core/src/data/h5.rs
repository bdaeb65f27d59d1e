//! Small helpers over the `hdf5` crate shared by the .h5ad and 10x .h5 readers:
//! strings in any of HDF5's encodings, numbers of any width, attributes.

use crate::error::{Error, Kind, Result};
use hdf5::types::{FixedAscii, FixedUnicode, TypeDescriptor, VarLenAscii, VarLenUnicode};
use hdf5::{Dataset, File, Group, Location};
use std::path::Path;

/// Open an HDF5 file read-only, telling "no such file" and "not HDF5" apart.
pub(crate) fn open(path: &Path) -> Result<File> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Err(Error::invalid(format!(
            "\"{}\" is a folder, not an HDF5 file",
            path.display()
        )));
    }
    File::open(path).map_err(|e| {
        Error::format(format!(
            "\"{}\" is not a readable HDF5 file ({e})",
            path.display()
        ))
        .with_hint("The file may be truncated or corrupt, or of another format.")
    })
}

pub(crate) fn is_group(parent: &Group, name: &str) -> bool {
    parent.link_exists(name)
        && matches!(parent.loc_type_by_name(name), Ok(hdf5::LocationType::Group))
}

pub(crate) fn is_dataset(parent: &Group, name: &str) -> bool {
    parent.link_exists(name)
        && matches!(
            parent.loc_type_by_name(name),
            Ok(hdf5::LocationType::Dataset)
        )
}

pub(crate) fn dataset(parent: &Group, name: &str) -> Result<Dataset> {
    if !is_dataset(parent, name) {
        return Err(Error::format(format!(
            "missing dataset \"{}/{}\"",
            parent.name().trim_end_matches('/'),
            name
        )));
    }
    parent
        .dataset(name)
        .map_err(|e| Error::format(format!("cannot open \"{name}\": {e}")))
}

/// Deflate, the usual HDF5 filter, cannot expand data more than about 1,032 times; a
/// dataset that declares more than this many times the bytes stored for it is lying.
const MAX_EXPANSION: u128 = 1100;

/// The number of elements `ds` declares, checked before anything is read: against the
/// bytes the file stores for it (and the file's size), and against the memory budget
/// (`out_elem`: bytes per element once read, e.g. 24 for a `String`).
pub(crate) fn checked_len(ds: &Dataset, out_elem: usize) -> Result<usize> {
    let what = ds.name();
    let shape = ds.shape();
    let n = shape
        .iter()
        .try_fold(1u128, |a, &d| a.checked_mul(d as u128))
        .filter(|&n| n <= usize::MAX as u128 / 64)
        .ok_or_else(|| {
            Error::format(format!("\"{what}\" declares an impossible shape {shape:?}"))
        })?;
    let elem = ds.dtype().map(|t| t.size()).unwrap_or(1).max(1) as u128;
    let stored = ds.storage_size() as u128;
    let file = ds.file().map(|f| f.size() as u128).unwrap_or(u128::MAX);
    let declared = n * elem;
    let room = stored.min(file).saturating_mul(MAX_EXPANSION) + 65_536;
    if declared > room {
        return Err(Error::format(format!(
            "\"{what}\" declares {n} elements ({declared} bytes) but the file stores {stored} bytes for it"
        ))
        .with_hint("The file is truncated or corrupt."));
    }
    crate::limits::check_bytes(
        n * (out_elem as u128).max(elem),
        &format!("reading \"{what}\""),
    )?;
    Ok(n as usize)
}

/// Text from a file as a Rust string: valid UTF-8 without NUL bytes, or a
/// file-format error naming the dataset and element.
fn text(bytes: &[u8], what: &str, i: usize) -> Result<String> {
    let s = std::str::from_utf8(bytes).map_err(|e| {
        Error::format(format!(
            "\"{what}\" element {i} is not valid UTF-8 (byte {} of {})",
            e.valid_up_to(),
            bytes.len()
        ))
    })?;
    if let Some(p) = s.find('\0') {
        return Err(Error::format(format!(
            "\"{what}\" element {i} contains a NUL byte at position {p}"
        )));
    }
    Ok(s.to_string())
}

fn texts<'a>(it: impl Iterator<Item = &'a [u8]>, what: &str) -> Result<Vec<String>> {
    it.enumerate().map(|(i, b)| text(b, what, i)).collect()
}

/// Read a dataset as strings, whatever HDF5 string type it uses.
pub(crate) fn read_strings(ds: &Dataset) -> Result<Vec<String>> {
    checked_len(ds, std::mem::size_of::<String>() + 16)?;
    crate::limits::interrupt();
    let what = ds.name();
    let err = |e: hdf5::Error| Error::format(format!("cannot read strings from \"{what}\": {e}"));
    let desc = ds.dtype().and_then(|t| t.to_descriptor()).map_err(err)?;
    macro_rules! fixed {
        ($n:expr, $ty:ident, $($size:literal)*) => {{
            $(if $n <= $size {
                let v = ds.read_raw::<$ty<$size>>().map_err(err)?;
                return texts(v.iter().map(|s| s.as_bytes()), &what);
            })*
            Err(Error::new(Kind::Limit, format!("strings of {} bytes in \"{what}\" are too long", $n)))
        }};
    }
    match desc {
        TypeDescriptor::VarLenUnicode => texts(
            ds.read_raw::<VarLenUnicode>()
                .map_err(err)?
                .iter()
                .map(|s| s.as_bytes()),
            &what,
        ),
        TypeDescriptor::VarLenAscii => texts(
            ds.read_raw::<VarLenAscii>()
                .map_err(err)?
                .iter()
                .map(|s| s.as_bytes()),
            &what,
        ),
        TypeDescriptor::FixedAscii(n) => fixed!(n, FixedAscii, 16 32 64 128 256 1024 4096),
        TypeDescriptor::FixedUnicode(n) => fixed!(n, FixedUnicode, 16 32 64 128 256 1024 4096),
        other => Err(Error::format(format!(
            "\"{what}\" holds {other}, not strings"
        ))),
    }
}

/// Is this dataset of a string type?
pub(crate) fn is_string(ds: &Dataset) -> bool {
    matches!(
        ds.dtype().and_then(|t| t.to_descriptor()),
        Ok(TypeDescriptor::VarLenUnicode
            | TypeDescriptor::VarLenAscii
            | TypeDescriptor::FixedAscii(_)
            | TypeDescriptor::FixedUnicode(_))
    )
}

pub(crate) fn descriptor(ds: &Dataset) -> Result<TypeDescriptor> {
    ds.dtype()
        .and_then(|t| t.to_descriptor())
        .map_err(|e| Error::format(format!("cannot read the type of \"{}\": {e}", ds.name())))
}

/// Read a numeric dataset (any integer or float width) as `T`.
pub(crate) fn read_num<T: hdf5::H5Type>(ds: &Dataset) -> Result<Vec<T>> {
    checked_len(ds, std::mem::size_of::<T>())?;
    crate::limits::interrupt();
    match descriptor(ds)? {
        TypeDescriptor::Integer(_)
        | TypeDescriptor::Unsigned(_)
        | TypeDescriptor::Float(_)
        | TypeDescriptor::Boolean
        | TypeDescriptor::Enum(_) => ds.read_raw::<T>().map_err(|e| {
            Error::format(format!("cannot read \"{}\": {e}", ds.name()))
                .with_hint("The file may be truncated or corrupt.")
        }),
        other => Err(Error::format(format!(
            "\"{}\" holds {other}, not numbers",
            ds.name()
        ))),
    }
}

/// Read a non-negative integer dataset (index pointers, indices) as usize.
pub(crate) fn read_index(ds: &Dataset) -> Result<Vec<usize>> {
    let v = read_num::<i64>(ds)?;
    v.iter()
        .map(|&x| {
            usize::try_from(x)
                .map_err(|_| Error::format(format!("negative index {x} in \"{}\"", ds.name())))
        })
        .collect()
}

/// A string attribute, if present (scalar, any string encoding).
pub(crate) fn attr_string(loc: &Location, name: &str) -> Option<String> {
    let a = loc.attr(name).ok()?;
    let desc = a.dtype().ok()?.to_descriptor().ok()?;
    match desc {
        TypeDescriptor::VarLenUnicode => a
            .read_scalar::<VarLenUnicode>()
            .ok()
            .and_then(|s| text(s.as_bytes(), name, 0).ok()),
        TypeDescriptor::VarLenAscii => a
            .read_scalar::<VarLenAscii>()
            .ok()
            .and_then(|s| text(s.as_bytes(), name, 0).ok()),
        TypeDescriptor::FixedAscii(_) => a
            .read_scalar::<FixedAscii<1024>>()
            .ok()
            .and_then(|s| text(s.as_bytes(), name, 0).ok()),
        TypeDescriptor::FixedUnicode(_) => a
            .read_scalar::<FixedUnicode<1024>>()
            .ok()
            .and_then(|s| text(s.as_bytes(), name, 0).ok()),
        _ => None,
    }
}

/// A 1-D string-array attribute (e.g. `column-order`); empty if absent.
pub(crate) fn attr_strings(loc: &Location, name: &str) -> Vec<String> {
    let Ok(a) = loc.attr(name) else {
        return Vec::new();
    };
    let Ok(desc) = a.dtype().and_then(|t| t.to_descriptor()) else {
        return Vec::new();
    };
    let r = match desc {
        TypeDescriptor::VarLenUnicode => a
            .read_raw::<VarLenUnicode>()
            .map(|v| texts(v.iter().map(|s| s.as_bytes()), name).unwrap_or_default()),
        TypeDescriptor::VarLenAscii => a
            .read_raw::<VarLenAscii>()
            .map(|v| texts(v.iter().map(|s| s.as_bytes()), name).unwrap_or_default()),
        TypeDescriptor::FixedAscii(_) => a
            .read_raw::<FixedAscii<1024>>()
            .map(|v| texts(v.iter().map(|s| s.as_bytes()), name).unwrap_or_default()),
        TypeDescriptor::FixedUnicode(_) => a
            .read_raw::<FixedUnicode<1024>>()
            .map(|v| texts(v.iter().map(|s| s.as_bytes()), name).unwrap_or_default()),
        _ => Ok(Vec::new()),
    };
    r.unwrap_or_default()
}

/// An integer-array attribute (e.g. `shape`).
pub(crate) fn attr_index(loc: &Location, name: &str) -> Option<Vec<usize>> {
    let a = loc.attr(name).ok()?;
    let v = a.read_raw::<i64>().ok()?;
    v.into_iter().map(|x| usize::try_from(x).ok()).collect()
}
