//! Writes the wide/tall image set of `skytrain::demo::rows` (rows and columns of objects, aspect
//! ratios 1:3 to 3:1) and its metadata table, for `skytrain curate`; prints the table's path.
//!
//!   cargo run --release --example rows_set -- OUT_DIR [N=2000]

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args.get(1).expect("usage: rows_set OUT_DIR [N]");
    let n = args.get(2).map(|s| s.parse().expect("N is a count")).unwrap_or(2000);
    let table = skytrain::demo::rows::write_set(std::path::Path::new(dir), n)?;
    println!("{}", table.display());
    Ok(())
}
