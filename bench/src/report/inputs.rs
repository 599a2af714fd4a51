//! Reading what the comparison tools wrote: engine-vs-fio's `--json`
//! summary, the TSV files of bench/fuse-compare.sh,
//! bench/docker-compare.sh and bench/containerd-compare.sh, and
//! bench/compare.sh's stages.tsv.

use super::ReportError;
use serde_json::Value;

/// One measurement of one peer in one round.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub row: String,
    /// Containers (docker-compare's launch row); `None` elsewhere.
    pub count: Option<u32>,
    pub round: u32,
    pub peer: String,
    pub metric: String,
    pub value: f64,
}

/// Every sample of one tool's run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Samples(pub Vec<Sample>);

impl Samples {
    /// The values of `metric` for `peer` (and `count`), in file order.
    pub fn values(&self, metric: &str, peer: &str, count: Option<u32>) -> Vec<f64> {
        self.0
            .iter()
            .filter(|s| s.metric == metric && s.peer == peer && s.count == count)
            .map(|s| s.value)
            .collect()
    }

    /// The container counts of the launch row, ascending.
    pub fn counts(&self) -> Vec<u32> {
        let mut counts: Vec<u32> = self.0.iter().filter_map(|s| s.count).collect();
        counts.sort_unstable();
        counts.dedup();
        counts
    }

    pub fn has_peer(&self, peer: &str) -> bool {
        self.0.iter().any(|s| s.peer == peer)
    }
}

fn bad(file: &str, line: usize, what: impl Into<String>) -> ReportError {
    ReportError::Parse {
        file: file.to_string(),
        line,
        what: what.into(),
    }
}

fn number<T: std::str::FromStr>(
    file: &str,
    line: usize,
    field: &str,
    text: &str,
) -> Result<T, ReportError> {
    text.parse()
        .map_err(|_| bad(file, line, format!("{field} '{text}' is not a number")))
}

/// bench/fuse-compare.sh: `row round peer metric value`.
pub fn parse_fuse_tsv(text: &str) -> Result<Samples, ReportError> {
    parse_tsv(text, "fuse-compare.tsv", false)
}

/// bench/docker-compare.sh: `row count round peer metric value`, count `-`
/// outside the launch row.
pub fn parse_docker_tsv(text: &str) -> Result<Samples, ReportError> {
    parse_tsv(text, "docker-compare.tsv", true)
}

/// bench/containerd-compare.sh: a header, then `row peer round seconds`;
/// each row's metric is the row's name.
pub fn parse_containerd_tsv(text: &str) -> Result<Samples, ReportError> {
    let file = "containerd-compare.tsv";
    let mut samples = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let n = index + 1;
        if line.trim().is_empty() || (n == 1 && line.starts_with("row\t")) {
            continue;
        }
        let [row, peer, round, seconds] = line.split('\t').collect::<Vec<_>>()[..] else {
            return Err(bad(file, n, "expected 4 fields: row, peer, round, seconds"));
        };
        samples.push(Sample {
            row: row.to_string(),
            count: None,
            round: number(file, n, "round", round)?,
            peer: peer.to_string(),
            metric: row.to_string(),
            value: number(file, n, "seconds", seconds)?,
        });
    }
    Ok(Samples(samples))
}

/// One sample per non-empty line: `row [count] round peer metric value`.
fn parse_tsv(text: &str, file: &str, with_count: bool) -> Result<Samples, ReportError> {
    let expected = if with_count { 6 } else { 5 };
    let mut samples = Vec::new();
    for (index, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let n = index + 1;
        let mut fields: Vec<&str> = line.split('\t').collect();
        if fields.len() != expected {
            return Err(bad(
                file,
                n,
                format!("{} fields, expected {expected}", fields.len()),
            ));
        }
        let count = match with_count {
            true => match fields.remove(1) {
                "-" => None,
                count => Some(number(file, n, "count", count)?),
            },
            false => None,
        };
        let [row, round, peer, metric, value] = fields[..] else {
            return Err(bad(file, n, "fields lost after the count"));
        };
        samples.push(Sample {
            row: row.to_string(),
            count,
            round: number(file, n, "round", round)?,
            peer: peer.to_string(),
            metric: metric.to_string(),
            value: number(file, n, "value", value)?,
        });
    }
    Ok(Samples(samples))
}

/// engine-vs-fio --json: the per-round MiB/s of each workload, by name
/// (`fio_seq_1m_qd16`, `engine_seq_1m`, `engine_rand_4k`), plus its settings.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineResults {
    pub workloads: Vec<(String, Vec<f64>)>,
    pub size_bytes: u64,
    pub fio_version: String,
}

impl EngineResults {
    pub fn values(&self, name: &str) -> Vec<f64> {
        self.workloads
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }
}

pub fn parse_engine_json(text: &str) -> Result<EngineResults, ReportError> {
    const FILE: &str = "engine-vs-fio.json";
    let json: Value = serde_json::from_str(text).map_err(|e| bad(FILE, e.line(), e.to_string()))?;
    let results = json["results"]
        .as_array()
        .ok_or_else(|| bad(FILE, 0, "no \"results\" array"))?;
    let mut workloads = Vec::new();
    for result in results {
        let name = result["name"]
            .as_str()
            .ok_or_else(|| bad(FILE, 0, "a result without a name"))?;
        let values = result["mib_per_second"]
            .as_array()
            .ok_or_else(|| bad(FILE, 0, format!("{name}: no mib_per_second array")))?
            .iter()
            .map(|v| {
                v.as_f64().ok_or_else(|| {
                    bad(FILE, 0, format!("{name}: a bandwidth that is not a number"))
                })
            })
            .collect::<Result<Vec<f64>, _>>()?;
        workloads.push((name.to_string(), values));
    }
    Ok(EngineResults {
        workloads,
        size_bytes: json["size_bytes"].as_u64().unwrap_or(0),
        fio_version: json["fio_version"].as_str().unwrap_or("?").to_string(),
    })
}

/// One line of bench/compare.sh's stages.tsv: `name seconds status command`.
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    pub name: String,
    pub seconds: u64,
    pub status: i32,
    pub command: String,
}

pub fn parse_stages(text: &str) -> Result<Vec<Stage>, ReportError> {
    const FILE: &str = "stages.tsv";
    let mut stages = Vec::new();
    for (index, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let n = index + 1;
        let mut fields = line.splitn(4, '\t');
        let (Some(name), Some(seconds), Some(status), Some(command)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(bad(FILE, n, "expected 4 fields"));
        };
        stages.push(Stage {
            name: name.to_string(),
            seconds: number(FILE, n, "seconds", seconds)?,
            status: number(FILE, n, "status", status)?,
            command: command.to_string(),
        });
    }
    Ok(stages)
}

/// The value after `flag` in a command line, e.g. `--readers 10`.
pub fn flag_value<'a>(command: &'a str, flag: &str) -> Option<&'a str> {
    let mut words = command.split_whitespace();
    words.by_ref().find(|w| *w == flag)?;
    words.next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuse_tsv_lines_become_samples() {
        let s =
            parse_fuse_tsv("metadata\t1\tlcfs\tuntar_s\t2.5\nmetadata\t2\tlcfs\tuntar_s\t3.5\n\n")
                .unwrap();
        assert_eq!(s.values("untar_s", "lcfs", None), vec![2.5, 3.5]);
        assert!(s.has_peer("lcfs") && !s.has_peer("overlay"));
        assert!(parse_fuse_tsv("metadata\t1\tlcfs\tuntar_s\n").is_err());
        assert!(parse_fuse_tsv("metadata\tx\tlcfs\tuntar_s\t1\n").is_err());
    }

    #[test]
    fn docker_tsv_keeps_the_container_count() {
        let text = "launch\t20\t1\tlcfs\tlaunch_s\t7.1\nlaunch\t40\t1\tlcfs\tlaunch_s\t14.2\nbuild\t-\t1\tbtrfs\tbuild_s\t20\n";
        let s = parse_docker_tsv(text).unwrap();
        assert_eq!(s.counts(), vec![20, 40]);
        assert_eq!(s.values("launch_s", "lcfs", Some(40)), vec![14.2]);
        assert_eq!(s.values("build_s", "btrfs", None), vec![20.0]);
    }

    #[test]
    fn containerd_tsv_rows_are_their_own_metric() {
        let text = "row\tpeer\tround\tseconds\nimport\tlcfs\t1\t4.9\nimport\toverlayfs\t1\t3.8\n";
        let s = parse_containerd_tsv(text).unwrap();
        assert_eq!(s.values("import", "lcfs", None), vec![4.9]);
        assert_eq!(s.values("import", "overlayfs", None), vec![3.8]);
        assert!(parse_containerd_tsv("row\tpeer\tround\tseconds\nimport\tlcfs\t1\n").is_err());
        assert!(parse_containerd_tsv("import\tlcfs\tx\t1\n").is_err());
    }

    #[test]
    fn engine_json_gives_each_workload() {
        let text = r#"{"fio_version":"fio-3.33","size_bytes":1024,
            "results":[{"name":"fio_seq_1m_qd16","mib_per_second":[1.0,2.0]},
                       {"name":"engine_seq_1m","mib_per_second":[3.0]}]}"#;
        let e = parse_engine_json(text).unwrap();
        assert_eq!(e.values("fio_seq_1m_qd16"), vec![1.0, 2.0]);
        assert_eq!(e.values("engine_rand_4k"), Vec::<f64>::new());
        assert_eq!(e.fio_version, "fio-3.33");
        assert!(parse_engine_json("{}").is_err());
    }

    #[test]
    fn stages_and_flags() {
        let s = parse_stages("fuse\t250\t0\tbash bench/fuse-compare.sh --quick --readers 10\n")
            .unwrap();
        assert_eq!(s[0].seconds, 250);
        assert_eq!(flag_value(&s[0].command, "--readers"), Some("10"));
        assert_eq!(flag_value(&s[0].command, "--rounds"), None);
    }
}
