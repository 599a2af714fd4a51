//! A comparison table: rows of per-peer summaries, the best peer and the
//! ratio of the subject (lcfs, or the engine) to it, as Markdown.

use super::stats::{ratio_to_best_peer, Better, Summary};

/// One row: what was measured and each column's runs.
#[derive(Debug, Clone)]
pub struct Row {
    pub label: String,
    pub unit: &'static str,
    pub better: Better,
    /// The runs of each column, in the table's column order.
    pub values: Vec<Vec<f64>>,
}

#[derive(Debug, Clone)]
pub struct Table {
    /// Column names; the first one is the subject the ratio is taken of.
    pub columns: Vec<String>,
    pub rows: Vec<Row>,
}

/// 3 significant digits or so, as the tools' own summaries print.
pub fn format_number(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn cell(summary: Option<Summary>) -> String {
    match summary {
        None => "-".to_string(),
        Some(s) if s.runs == 1 => format!("{} (1 run)", format_number(s.median)),
        Some(s) => {
            let spread = s
                .relative_spread()
                .map(|r| format!(", spread {:.0}%", r * 100.0))
                .unwrap_or_default();
            format!(
                "{} ({}-{}{spread})",
                format_number(s.median),
                format_number(s.min),
                format_number(s.max)
            )
        }
    }
}

impl Row {
    /// The best of the other columns and the subject's ratio to it.
    pub fn ratio(&self, columns: &[String]) -> Option<(String, f64)> {
        let subject = Summary::of(self.values.first()?)?;
        let peers: Vec<(&str, Summary)> = columns
            .iter()
            .zip(&self.values)
            .skip(1)
            .filter_map(|(name, values)| Some((name.as_str(), Summary::of(values)?)))
            .collect();
        ratio_to_best_peer(subject, &peers, self.better)
    }
}

impl Table {
    pub fn to_markdown(&self) -> String {
        let subject = &self.columns[0];
        let mut out = format!(
            "| row | unit | better | {} | best peer | {subject} / best peer |\n",
            self.columns
                .iter()
                .map(|c| format!("{c}: median (min-max, spread)"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        out.push_str(&"|---".repeat(self.columns.len() + 5));
        out.push_str("|\n");
        for row in &self.rows {
            if row.values.iter().all(|v| Summary::of(v).is_none()) {
                continue;
            }
            let cells: Vec<String> = row.values.iter().map(|v| cell(Summary::of(v))).collect();
            let (best, ratio) = match row.ratio(&self.columns) {
                Some((name, ratio)) => (name, format!("**{ratio:.2}**")),
                None => ("-".to_string(), "-".to_string()),
            };
            out.push_str(&format!(
                "| {} | {} | {} | {} | {best} | {ratio} |\n",
                row.label,
                row.unit,
                row.better.word(),
                cells.join(" | ")
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_shows_median_spread_and_ratio_to_the_best_peer() {
        let table = Table {
            columns: vec!["lcfs".into(), "overlay".into(), "fuse-overlayfs".into()],
            rows: vec![
                Row {
                    label: "untar".into(),
                    unit: "s",
                    better: Better::Lower,
                    values: vec![vec![3.0, 2.0, 4.0], vec![1.0, 1.0, 1.0], vec![8.0]],
                },
                Row {
                    label: "nothing measured".into(),
                    unit: "s",
                    better: Better::Lower,
                    values: vec![vec![], vec![], vec![]],
                },
            ],
        };
        let md = table.to_markdown();
        assert!(md.contains("| untar | s | lower | 3.00 (2.00-4.00, spread 67%) | 1.00 (1.00-1.00, spread 0%) | 8.00 (1 run) | overlay | **3.00** |"), "{md}");
        assert!(!md.contains("nothing measured"));
    }

    #[test]
    fn numbers_keep_about_three_digits() {
        assert_eq!(format_number(1845.4), "1845");
        assert_eq!(format_number(18.45), "18.4");
        assert_eq!(format_number(1.845), "1.84");
    }
}
