//! `mirror-chart TSV PNG`: the chart of bench/mirror-compare.sh's results
//! (lines `mirror N round peer wall seconds`, as docker-compare's TSV).

use lcfs_bench::report::{mirror_chart, parse_docker_tsv};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [tsv, png] = &args[..] else {
        eprintln!("usage: mirror-chart TSV PNG");
        return ExitCode::FAILURE;
    };
    let result = std::fs::read_to_string(tsv)
        .map_err(|e| format!("{tsv}: {e}"))
        .and_then(|text| parse_docker_tsv(&text).map_err(|e| e.to_string()))
        .and_then(|samples| {
            mirror_chart(&samples, std::path::Path::new(png)).map_err(|e| e.to_string())
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mirror-chart: {e}");
            ExitCode::FAILURE
        }
    }
}
