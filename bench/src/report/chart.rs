//! PNG charts of the container lifecycle (plotters, bitmap backend): for
//! launch, teardown and their sum, seconds against N containers, one line
//! per driver through the medians, with a bar from the fastest to the
//! slowest round at each N.

use super::inputs::Samples;
use super::stats::Summary;
use super::ReportError;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Where the text of the charts comes from: a TrueType font read at run time
/// (ab_glyph draws it, so no fontconfig is needed). `LCFS_CHART_FONT` names
/// another file.
const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Reads and registers the font once per process; plotters wants the bytes
/// for the life of the program, so they are leaked on purpose (one file).
fn register_chart_font() -> Result<(), ReportError> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let from_environment = std::env::var("LCFS_CHART_FONT").ok();
            let candidates = from_environment.iter().map(String::as_str).chain(FONT_CANDIDATES.iter().copied());
            for path in candidates {
                if let Ok(bytes) = std::fs::read(path) {
                    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                    return register_font("sans-serif", FontStyle::Normal, bytes)
                        .map_err(|_| format!("{path} is not a font plotters can read"));
                }
            }
            Err(format!(
                "no TrueType font found (tried {}; set LCFS_CHART_FONT, or apt-get install fonts-dejavu-core)",
                FONT_CANDIDATES.join(", ")
            ))
        })
        .clone()
        .map_err(ReportError::Chart)
}

/// The lifecycle phases charted, by docker-compare's metric names.
pub const PHASES: &[(&str, &str, &str)] = &[
    ("launch_s", "launch", "N x docker run -d, one after another"),
    ("teardown_s", "teardown", "one docker rm -f of all N"),
    ("total_s", "lifecycle", "launch + teardown"),
];

const DRIVER_COLOURS: &[RGBColor] = &[
    RGBColor(214, 39, 40),  // lcfs
    RGBColor(31, 119, 180), // overlay2
    RGBColor(44, 160, 44),  // fuse-overlayfs
    RGBColor(255, 127, 14), // btrfs
    RGBColor(148, 103, 189),
];

/// One chart per phase under `directory`; returns the files written.
pub fn lifecycle_charts(
    samples: &Samples,
    drivers: &[&str],
    directory: &Path,
) -> Result<Vec<PathBuf>, ReportError> {
    let counts = samples.counts();
    if counts.is_empty() {
        return Ok(Vec::new());
    }
    register_chart_font()?;
    std::fs::create_dir_all(directory).map_err(|e| ReportError::Io(directory.to_path_buf(), e))?;
    let mut written = Vec::new();
    for (metric, name, what) in PHASES {
        let path = directory.join(format!("docker-{name}.png"));
        draw(
            samples,
            drivers,
            &counts,
            metric,
            (&format!("Container {name}: {what}"), "containers (N)"),
            &path,
        )
        .map_err(|e| ReportError::Chart(format!("{}: {e}", path.display())))?;
        written.push(path);
    }
    Ok(written)
}

/// bench/mirror-compare.sh's chart: seconds until N hosts all hold one
/// image, pulling it through lcfs mirrors (`cooperative`) or each from the
/// registry (`direct`), against N.
pub fn mirror_chart(samples: &Samples, path: &Path) -> Result<(), ReportError> {
    let counts = samples.counts();
    if counts.is_empty() {
        return Err(ReportError::Chart("no samples with a host count".into()));
    }
    register_chart_font()?;
    draw(
        samples,
        &["cooperative", "direct"],
        &counts,
        "wall",
        (
            "One image pulled on N hosts at once: lcfs mirrors against the registry alone",
            "hosts pulling at once (N)",
        ),
        path,
    )
    .map_err(|e| ReportError::Chart(format!("{}: {e}", path.display())))
}

fn draw(
    samples: &Samples,
    drivers: &[&str],
    counts: &[u32],
    metric: &str,
    (title, x_desc): (&str, &str),
    path: &Path,
) -> Result<(), Box<dyn std::error::Error>> {
    // (driver, [(N, summary)]) for every driver with data.
    let series: Vec<(&str, Vec<(u32, Summary)>)> = drivers
        .iter()
        .map(|&d| {
            let points = counts
                .iter()
                .filter_map(|&n| Some((n, Summary::of(&samples.values(metric, d, Some(n)))?)))
                .collect::<Vec<_>>();
            (d, points)
        })
        .filter(|(_, points)| !points.is_empty())
        .collect();
    let y_top = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, s)| s.max))
        .fold(1.0_f64, f64::max)
        * 1.1;
    let (x_low, x_high) = (counts[0], counts[counts.len() - 1]);
    let margin = ((x_high - x_low) / 10).max(5);

    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(
            (x_low.saturating_sub(margin)..x_high + margin).with_key_points(counts.to_vec()),
            0.0..y_top,
        )?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("seconds (median; bar: min-max)")
        .axis_desc_style(("sans-serif", 18))
        .label_style(("sans-serif", 15))
        .draw()?;
    for (index, (driver, points)) in series.iter().enumerate() {
        let colour = DRIVER_COLOURS[index % DRIVER_COLOURS.len()];
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|(n, s)| (*n, s.median)),
                colour.stroke_width(3),
            ))?
            .label(*driver)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(3))
            });
        chart.draw_series(
            points
                .iter()
                .map(|(n, s)| Circle::new((*n, s.median), 5, colour.filled())),
        )?;
        chart.draw_series(points.iter().map(|(n, s)| {
            ErrorBar::new_vertical(*n, s.min, s.median, s.max, colour.stroke_width(2), 12)
        }))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 17))
        .draw()?;
    root.present()?;
    Ok(())
}
