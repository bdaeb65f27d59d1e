//! Matrix Market coordinate files (`matrix.mtx[.gz]`), as Cell Ranger writes them:
//! genes × cells, `integer` or `real` values.
//!
//! Written here rather than taken from a crate: the readers we looked at panic on an
//! index out of range and report errors without line numbers, and a user loading a
//! corrupt 2-million-line file needs both the line and the numbers.

use crate::data::check_count;
use crate::error::{Error, Result};
use std::io::BufRead;

/// A sparse matrix read from a Matrix Market file, as triplets (0-based).
#[derive(Debug, Default)]
pub struct Triplets {
    pub rows: usize,
    pub cols: usize,
    pub row: Vec<u32>,
    pub col: Vec<u32>,
    pub val: Vec<f32>,
}

fn parse_usize(tok: Option<&str>, line_no: usize, what: &str) -> Result<usize> {
    let t = tok.ok_or_else(|| Error::format(format!("line {line_no}: missing {what}")))?;
    t.parse::<usize>().map_err(|_| {
        Error::format(format!(
            "line {line_no}: {what} \"{t}\" is not a non-negative integer"
        ))
    })
}

/// Lines of a Matrix Market file as bytes (the format is ASCII), numbered from 1, with
/// read errors that say where.
struct Lines<R> {
    reader: R,
    line: Vec<u8>,
    no: usize,
}

impl<R: BufRead> Lines<R> {
    /// The next line into `self.line`; false at the end of the file.
    fn next(&mut self) -> Result<bool> {
        self.line.clear();
        self.no += 1;
        let no = self.no;
        match self.reader.read_until(b'\n', &mut self.line) {
            Ok(0) => Ok(false),
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(Error::format(format!(
                "file is truncated or its compression is corrupt near line {no}"
            ))),
            Err(e)
                if e.kind() == std::io::ErrorKind::InvalidData
                    || e.kind() == std::io::ErrorKind::InvalidInput =>
            {
                Err(Error::format(format!(
                    "file is corrupt near line {no}: {e}"
                )))
            }
            Err(e) => Err(Error::new(
                crate::Kind::Io,
                format!("read error near line {no}: {e}"),
            )),
        }
    }

    /// The current line as text (for the header lines and messages).
    fn text(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.line)
    }
}

/// The banner line: whether the matrix is a `pattern` (no values).
fn parse_banner(line: &str) -> Result<bool> {
    let header = line.trim().to_ascii_lowercase();
    let h: Vec<&str> = header.split_whitespace().collect();
    if h.len() < 5 || h[0] != "%%matrixmarket" || h[1] != "matrix" {
        return Err(Error::format(format!(
            "not a Matrix Market file: first line is \"{}\"",
            line.trim().chars().take(80).collect::<String>()
        )));
    }
    if h[2] != "coordinate" {
        return Err(Error::format(format!(
            "Matrix Market format \"{}\" is not supported (expected coordinate)",
            h[2]
        )));
    }
    let pattern = match h[3] {
        "integer" | "real" => false,
        "pattern" => true,
        other => {
            return Err(Error::format(format!(
                "Matrix Market field \"{other}\" is not supported (expected integer or real)"
            )))
        }
    };
    if h[4] != "general" {
        return Err(Error::format(format!(
            "Matrix Market symmetry \"{}\" is not supported (expected general)",
            h[4]
        )));
    }
    Ok(pattern)
}

/// The size line `rows cols entries`, checked against itself.
fn parse_size(line: &str, line_no: usize) -> Result<(usize, usize, usize)> {
    let mut it = line.split_whitespace();
    let rows = parse_usize(it.next(), line_no, "row count")?;
    let cols = parse_usize(it.next(), line_no, "column count")?;
    let entries = parse_usize(it.next(), line_no, "entry count")?;
    if rows > u32::MAX as usize || cols > u32::MAX as usize {
        return Err(Error::new(
            crate::Kind::Limit,
            format!("matrix of {rows} × {cols} is too large"),
        ));
    }
    if rows.checked_mul(cols).map(|n| n < entries).unwrap_or(false) {
        return Err(Error::format(format!(
            "{entries} entries declared for a {rows} × {cols} matrix"
        )));
    }
    Ok((rows, cols, entries))
}

/// Holding a whole matrix in memory: the triplets (12 bytes an entry), then the CSR
/// copy (8 more) and one offset per cell and gene, checked against the memory budget
/// before anything is allocated.
fn check_in_memory(rows: usize, cols: usize, entries: usize) -> Result<()> {
    crate::limits::check_bytes(
        entries as u128 * 20 + (rows as u128 + cols as u128 + 2) * 8,
        &format!("a Matrix Market matrix of {rows} × {cols} with {entries} entries"),
    )
}

/// A token of an entry line, for messages.
fn show(tok: &[u8]) -> String {
    String::from_utf8_lossy(tok).chars().take(40).collect()
}

/// The next whitespace-separated token of `s` from `*pos`.
fn token<'a>(s: &'a [u8], pos: &mut usize) -> Option<&'a [u8]> {
    let mut i = *pos;
    while i < s.len() && s[i].is_ascii_whitespace() {
        i += 1;
    }
    let start = i;
    while i < s.len() && !s[i].is_ascii_whitespace() {
        i += 1;
    }
    *pos = i;
    (i > start).then(|| &s[start..i])
}

/// A non-negative decimal integer token (at most 19 digits, so it cannot overflow).
fn uint(tok: &[u8]) -> Option<usize> {
    if tok.is_empty() || tok.len() > 19 {
        return None;
    }
    let mut v = 0usize;
    for &b in tok {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v * 10 + (b - b'0') as usize;
    }
    Some(v)
}

fn index_token(tok: Option<&[u8]>, line_no: usize, what: &str) -> Result<usize> {
    let t = tok.ok_or_else(|| Error::format(format!("line {line_no}: missing {what}")))?;
    uint(t).ok_or_else(|| {
        Error::format(format!(
            "line {line_no}: {what} \"{}\" is not a non-negative integer",
            show(t)
        ))
    })
}

/// One entry line: 1-based (row, column) in range, and its value (1 for a pattern).
fn parse_entry(
    s: &[u8],
    line_no: usize,
    (rows, cols): (usize, usize),
    pattern: bool,
) -> Result<(usize, usize, f64)> {
    let mut pos = 0;
    let r = index_token(token(s, &mut pos), line_no, "row index")?;
    let c = index_token(token(s, &mut pos), line_no, "column index")?;
    if r == 0 || r > rows {
        return Err(Error::format(format!(
            "line {line_no}: row index {r} out of range 1..{rows}"
        )));
    }
    if c == 0 || c > cols {
        return Err(Error::format(format!(
            "line {line_no}: column index {c} out of range 1..{cols}"
        )));
    }
    let v: f64 = if pattern {
        1.0
    } else {
        let tok = token(s, &mut pos)
            .ok_or_else(|| Error::format(format!("line {line_no}: missing value")))?;
        // Counts are mostly small integers: parse those directly, anything else as a float.
        match uint(tok).filter(|_| tok.len() <= 15) {
            Some(n) => n as f64,
            None => std::str::from_utf8(tok)
                .ok()
                .and_then(|t| t.parse::<f64>().ok())
                .ok_or_else(|| {
                    Error::format(format!(
                        "line {line_no}: value \"{}\" is not a number",
                        show(tok)
                    ))
                })?,
        }
    };
    check_count(v, || format!("line {line_no} (row {r}, column {c})"))?;
    Ok((r, c, v))
}

/// The entries of a Matrix Market coordinate file, one at a time: the banner and size
/// line are read and checked by [`Entries::open`], each entry line by
/// [`Entries::next`], and the end of the file against the declared entry count.
pub struct Entries<R> {
    lines: Lines<R>,
    pattern: bool,
    /// Rows, columns and entries, as the size line declares them.
    pub rows: usize,
    pub cols: usize,
    pub entries: usize,
    read: usize,
}

impl<R: BufRead> Entries<R> {
    /// Read and check the banner, comments and size line.
    pub fn open(reader: R) -> Result<Self> {
        let mut lines = Lines {
            reader,
            line: Vec::with_capacity(128),
            no: 0,
        };
        if !lines.next()? {
            return Err(Error::format("file is empty"));
        }
        let pattern = parse_banner(&lines.text())?;
        // Skip comments, read the size line.
        loop {
            if !lines.next()? {
                return Err(Error::format("file ends before its size line"));
            }
            let t = lines.line.trim_ascii();
            if !(t.is_empty() || t.starts_with(b"%")) {
                break;
            }
        }
        let (rows, cols, entries) = parse_size(&lines.text(), lines.no)?;
        Ok(Entries {
            lines,
            pattern,
            rows,
            cols,
            entries,
            read: 0,
        })
    }

    /// The next non-zero entry as 0-based (row, column, value); `None` after the last
    /// declared entry, once the rest of the file was checked to hold nothing more.
    /// Values are finite and non-negative; zero entries are skipped.
    pub fn next(&mut self) -> Result<Option<(u32, u32, f32)>> {
        while self.read < self.entries {
            if !self.lines.next()? {
                return Err(Error::format(format!(
                    "file is truncated: {} of {} declared entries read",
                    self.read, self.entries
                )));
            }
            if self.lines.no % 65_536 == 0 {
                crate::limits::interrupt();
            }
            let s = self.lines.line.trim_ascii();
            if s.is_empty() {
                continue;
            }
            let (r, c, v) = parse_entry(s, self.lines.no, (self.rows, self.cols), self.pattern)?;
            self.read += 1;
            if v != 0.0 {
                return Ok(Some(((r - 1) as u32, (c - 1) as u32, v as f32)));
            }
        }
        // Anything after the declared entries other than blank lines means the header lied.
        while self.lines.next()? {
            if !self.lines.line.trim_ascii().is_empty() {
                return Err(Error::format(format!(
                    "line {}: more entries than the {} declared",
                    self.lines.no, self.entries
                )));
            }
        }
        Ok(None)
    }

    /// The line number of the entry last returned.
    pub fn line_no(&self) -> usize {
        self.lines.no
    }
}

/// Read a whole Matrix Market coordinate matrix from `reader` into memory. Zero entries
/// are dropped; values must be finite and non-negative.
pub fn read<R: BufRead>(reader: R) -> Result<Triplets> {
    read_entries(Entries::open(reader)?)
}

/// The rest of an opened file's entries into memory (see [`read`]).
pub fn read_entries<R: BufRead>(mut e: Entries<R>) -> Result<Triplets> {
    let (rows, cols, entries) = (e.rows, e.cols, e.entries);
    check_in_memory(rows, cols, entries)?;
    // Grow with the entries actually read, never from the header's word alone.
    let cap = entries.min(1 << 16);
    let mut t = Triplets {
        rows,
        cols,
        row: Vec::with_capacity(cap),
        col: Vec::with_capacity(cap),
        val: Vec::with_capacity(cap),
    };
    while let Some((r, c, v)) = e.next()? {
        t.row.push(r);
        t.col.push(c);
        t.val.push(v);
    }
    Ok(t)
}

/// What [`Columns::next_column`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnStep {
    /// Column `0`-based index, its entries in the buffers (possibly none).
    Column(usize),
    /// Every column was returned and the file is read to its end.
    End,
    /// An entry of an earlier column came after a later column's entries (at this line,
    /// in this 1-based column): the file is not grouped by column.
    OutOfOrder { line: usize, column: usize },
}

/// The columns of a coordinate file one at a time, for files whose entries come
/// grouped by column in ascending column order (as Cell Ranger and scipy write a
/// genes × cells matrix). Every column `0..cols` is returned, empty ones included;
/// rows within a column come out sorted, and a row listed twice is an error.
pub struct Columns<R> {
    entries: Entries<R>,
    next_col: usize,
    pending: Option<(u32, u32, f32)>,
    done: bool,
    order: Vec<usize>,
}

impl<R: BufRead> Columns<R> {
    pub fn new(entries: Entries<R>) -> Self {
        Columns {
            entries,
            next_col: 0,
            pending: None,
            done: false,
            order: Vec::new(),
        }
    }

    /// Rows, columns and declared entries of the file.
    pub fn shape(&self) -> (usize, usize, usize) {
        (self.entries.rows, self.entries.cols, self.entries.entries)
    }

    fn entry(&mut self) -> Result<Option<(u32, u32, f32)>> {
        if let Some(e) = self.pending.take() {
            return Ok(Some(e));
        }
        if self.done {
            return Ok(None);
        }
        let e = self.entries.next()?;
        self.done = e.is_none();
        Ok(e)
    }

    /// The next column's rows and values into `rows` and `vals` (cleared first).
    pub fn next_column(&mut self, rows: &mut Vec<u32>, vals: &mut Vec<f32>) -> Result<ColumnStep> {
        rows.clear();
        vals.clear();
        let col = self.next_col;
        loop {
            match self.entry()? {
                None => break,
                Some((r, c, v)) if c as usize == col => {
                    rows.push(r);
                    vals.push(v);
                }
                Some(e) if (e.1 as usize) > col => {
                    self.pending = Some(e);
                    break;
                }
                Some((_, c, _)) => {
                    return Ok(ColumnStep::OutOfOrder {
                        line: self.entries.line_no(),
                        column: c as usize + 1,
                    })
                }
            }
        }
        if col >= self.entries.cols {
            return Ok(ColumnStep::End);
        }
        if !rows.windows(2).all(|w| w[0] < w[1]) {
            self.order.clear();
            self.order.extend(0..rows.len());
            self.order.sort_by_key(|&i| rows[i]);
            let r: Vec<u32> = self.order.iter().map(|&i| rows[i]).collect();
            let v: Vec<f32> = self.order.iter().map(|&i| vals[i]).collect();
            *rows = r;
            *vals = v;
            if let Some(w) = rows.windows(2).find(|w| w[0] == w[1]) {
                return Err(Error::format(format!(
                    "entry (row {}, column {}) appears more than once",
                    w[0] + 1,
                    col + 1
                )));
            }
        }
        self.next_col += 1;
        Ok(ColumnStep::Column(col))
    }
}

/// Group triplets of a genes × cells matrix by cell into CSR (cells × genes), entries
/// sorted by gene. A gene listed twice for one cell is an error.
pub fn cells_by_genes(t: &Triplets) -> Result<(Vec<usize>, Vec<u32>, Vec<f32>)> {
    let n_cells = t.cols;
    let mut ptr = vec![0usize; n_cells + 1];
    for &c in &t.col {
        ptr[c as usize + 1] += 1;
    }
    for i in 0..n_cells {
        ptr[i + 1] += ptr[i];
    }
    let mut next = ptr.clone();
    let nnz = t.val.len();
    let mut idx = vec![0u32; nnz];
    let mut val = vec![0f32; nnz];
    for k in 0..nnz {
        let c = t.col[k] as usize;
        idx[next[c]] = t.row[k];
        val[next[c]] = t.val[k];
        next[c] += 1;
    }
    let mut order: Vec<usize> = Vec::new();
    for c in 0..n_cells {
        let (lo, hi) = (ptr[c], ptr[c + 1]);
        let sorted = idx[lo..hi].windows(2).all(|w| w[0] < w[1]);
        if !sorted {
            order.clear();
            order.extend(0..hi - lo);
            order.sort_by_key(|&i| idx[lo + i]);
            let gi: Vec<u32> = order.iter().map(|&i| idx[lo + i]).collect();
            let gv: Vec<f32> = order.iter().map(|&i| val[lo + i]).collect();
            idx[lo..hi].copy_from_slice(&gi);
            val[lo..hi].copy_from_slice(&gv);
            if let Some(w) = idx[lo..hi].windows(2).find(|w| w[0] == w[1]) {
                return Err(Error::format(format!(
                    "entry (row {}, column {}) appears more than once",
                    w[0] + 1,
                    c + 1
                )));
            }
        }
    }
    Ok((ptr, idx, val))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Triplets> {
        read(std::io::Cursor::new(s.as_bytes()))
    }

    const GOOD: &str = "%%MatrixMarket matrix coordinate integer general\n%comment\n3 2 4\n1 1 5\n3 1 1\n2 2 2\n1 2 0\n";

    #[test]
    fn reads_and_groups() {
        let t = parse(GOOD).unwrap();
        assert_eq!((t.rows, t.cols, t.val.len()), (3, 2, 3));
        let (p, i, v) = cells_by_genes(&t).unwrap();
        assert_eq!(p, vec![0, 2, 3]);
        assert_eq!(i, vec![0, 2, 1]);
        assert_eq!(v, vec![5.0, 1.0, 2.0]);
    }

    #[test]
    fn bad_files_are_errors_with_numbers() {
        let e =
            parse("%%MatrixMarket matrix coordinate integer general\n3 2 4\n1 1 5\n").unwrap_err();
        assert!(e.message.contains("truncated: 1 of 4"), "{e}");
        let e =
            parse("%%MatrixMarket matrix coordinate integer general\n3 2 1\n4 1 5\n").unwrap_err();
        assert!(e.message.contains("row index 4 out of range 1..3"), "{e}");
        let e =
            parse("%%MatrixMarket matrix coordinate real general\n3 2 1\n1 1 -2\n").unwrap_err();
        assert!(e.message.contains("negative count -2"), "{e}");
        assert_eq!(e.kind, crate::Kind::Data);
        let e =
            parse("%%MatrixMarket matrix coordinate real general\n3 2 1\n1 1 nan\n").unwrap_err();
        assert!(e.message.contains("not finite"), "{e}");
        let e = parse("hello\n").unwrap_err();
        assert!(e.message.contains("not a Matrix Market file"), "{e}");
        let e = parse("%%MatrixMarket matrix coordinate integer general\n3 2 1\n1 1 5\n2 2 1\n")
            .unwrap_err();
        assert!(e.message.contains("more entries"), "{e}");
        let t = parse("%%MatrixMarket matrix coordinate integer general\n3 2 2\n1 1 5\n1 1 1\n")
            .unwrap();
        assert!(cells_by_genes(&t)
            .unwrap_err()
            .message
            .contains("more than once"));
        // non-integer counts are valid (ambient-corrected data)
        let t = parse("%%MatrixMarket matrix coordinate real general\n3 2 1\n1 1 0.25\n").unwrap();
        assert_eq!(t.val, vec![0.25]);
    }

    /// A three-line header may not reserve memory: sizes past the budget are refused
    /// before anything is allocated, and a plausible header grows only with real lines.
    #[test]
    fn header_sizes_are_bounded_before_allocation() {
        let e = parse("%%MatrixMarket matrix coordinate integer general\n4294967295 4294967295 1000000000000\n")
            .unwrap_err();
        assert_eq!(e.kind, crate::Kind::Limit, "{e}");
        assert!(e.message.contains("exceiver.max_memory"), "{e}");
        let e = parse(
            "%%MatrixMarket matrix coordinate integer general\n30000 4000000 500000000\n1 1 1\n",
        )
        .unwrap_err();
        assert_eq!(e.kind, crate::Kind::Limit, "{e}");
        // within the budget, a lying header is a truncation error, not a big allocation
        let e = parse(
            "%%MatrixMarket matrix coordinate integer general\n30000 40000 20000000\n1 1 1\n",
        )
        .unwrap_err();
        assert!(e.message.contains("truncated: 1 of 20000000"), "{e}");
    }
}
