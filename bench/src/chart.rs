//! `target/bench/report.png`: the report as a picture. Top, each scenario's ratios as
//! horizontal bars (`tally / limit`, `tally / baseline`) with a line at 1; below, Tally's p50
//! and p99 latency per scenario. Both axes are logarithmic.
//!
//! Text is drawn with a font compiled into the binary (`assets/DejaVuSans-ascii.ttf`, DejaVu
//! Sans cut down to ASCII), through plotters' `ab_glyph` backend: no system font, no
//! fontconfig, so the chart renders the same on any machine.

use std::path::Path;
use std::sync::Once;

use anyhow::{Context, anyhow};
use plotters::coord::Shift;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use crate::report::{Report, ScenarioResult};

/// The font family name the chart registers its font under.
const FONT: &str = "sans-serif";
const FONT_BYTES: &[u8] = include_bytes!("../assets/DejaVuSans-ascii.ttf");
/// Width of the picture, in pixels.
const WIDTH_PX: u32 = 1_400;
/// Height of one scenario's row in each panel, in pixels.
const ROW_PX: u32 = 46;
/// Height of a panel beyond its rows (caption, axis), in pixels.
const PANEL_EXTRA_PX: u32 = 130;
/// Room left of the panels for the scenario names, in pixels.
const NAMES_PX: u32 = 180;

const LIMIT_COLOR: RGBColor = RGBColor(52, 101, 164);
const BASELINE_COLOR: RGBColor = RGBColor(237, 125, 49);
const P50_COLOR: RGBColor = RGBColor(112, 173, 71);
const P99_COLOR: RGBColor = RGBColor(192, 0, 0);

/// Writes the chart of `report` to `path` (PNG).
pub fn render_png(report: &Report, path: &Path) -> anyhow::Result<()> {
    register_font()?;
    let rows = u32::try_from(report.scenarios.len().max(1))?;
    let panel_px = PANEL_EXTRA_PX + rows * ROW_PX;
    let root = BitMapBackend::new(path, (WIDTH_PX, 2 * panel_px + 40)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let (title, panels) = root.split_vertically(40);
    title
        .titled(
            &format!("Tally benchmark, {} ({})", report.started_at, report.machine),
            (FONT, 16).into_font(),
        )
        .map_err(plot_error)?;
    let (upper, lower) = panels.split_vertically(panel_px);
    draw_ratios(&upper, &report.scenarios).map_err(plot_error)?;
    draw_latency(&lower, &report.scenarios).map_err(plot_error)?;
    root.present()
        .map_err(plot_error)
        .with_context(|| format!("writing {}", path.display()))
}

fn register_font() -> anyhow::Result<()> {
    static REGISTERED: Once = Once::new();
    let mut result = Ok(());
    REGISTERED.call_once(|| {
        result = plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES)
            .map_err(|_| anyhow!("the chart's font does not load"));
    });
    result
}

/// Plotters' errors borrow the backend's error type; keep the message only.
fn plot_error(error: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing the chart: {error}")
}

/// The vertical position of row `index` of `rows`: the first scenario at the top.
fn row_y(index: usize, rows: usize) -> f64 {
    (rows - 1 - index) as f64
}

/// An x tick's label: at most three decimals, without trailing zeros (`2.5`, `10`, `0.125`).
fn axis_number(x: f64) -> String {
    let text = format!("{x:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// How many y ticks to ask for so that plotters' tick step comes out at 0.5 or 1: every row's
/// whole number gets a tick, which [`name_of`] labels (the half steps stay blank).
fn name_ticks(rows: usize) -> usize {
    2 * rows + 1
}

/// The label of a y tick: the name of the scenario whose row it is, blank between rows.
fn name_of(scenarios: &[ScenarioResult], y: f64) -> String {
    let rows = scenarios.len();
    let index = rows as f64 - 1.0 - y.round();
    if index < 0.0 || y.fract().abs() > 1e-6 {
        return String::new();
    }
    scenarios
        .get(index as usize)
        .map(|s| s.name.clone())
        .unwrap_or_default()
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;
type DrawResult = Result<(), DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>>;
type Chart<'a, 'b, X> = ChartContext<'a, BitMapBackend<'b>, Cartesian2d<X, RangedCoordf64>>;

/// One of the two bars in every scenario's row.
struct Bar {
    label: &'static str,
    value: fn(&ScenarioResult) -> Option<f64>,
    color: RGBColor,
}

/// A panel: one row per scenario, two bars in each (the first above the row's middle).
struct Panel {
    caption: &'static str,
    x_desc: &'static str,
    bars: [Bar; 2],
    /// Where the bars start on the x axis.
    base: f64,
    /// Decimals of the value printed at the end of each bar.
    decimals: usize,
}

fn draw_ratios(area: &Area<'_>, scenarios: &[ScenarioResult]) -> DrawResult {
    let rows = scenarios.len().max(1);
    // Logarithmic: a hot account can be tens of times the baseline while an append is a
    // fraction of its limit, and both must stay readable. Always spans 1.
    let ratios = || {
        scenarios
            .iter()
            .flat_map(|s| [s.ratio_limit, s.ratio_baseline])
            .flatten()
    };
    let x_min = (ratios().fold(1.0_f64, f64::min) / 2.0).max(0.001);
    let x_max = ratios().fold(1.0_f64, f64::max) * 2.0;
    let panel = Panel {
        caption: "Throughput ratios (log scale; right of the line: faster than the reference)",
        x_desc: "tally / limit (raw Postgres or JetStream work),  tally / baseline (stock cqrs-es + postgres-es)",
        bars: [
            Bar {
                label: "tally / limit",
                value: |s| s.ratio_limit,
                color: LIMIT_COLOR,
            },
            Bar {
                label: "tally / baseline",
                value: |s| s.ratio_baseline,
                color: BASELINE_COLOR,
            },
        ],
        base: x_min,
        decimals: 2,
    };
    draw_panel(area, scenarios, &panel, (x_min..x_max).log_scale(), |chart| {
        // Where Tally matches the reference.
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(1.0, -0.5), (1.0, rows as f64 - 0.5)],
            BLACK.stroke_width(2),
        )))?;
        Ok(())
    })
}

fn draw_latency(area: &Area<'_>, scenarios: &[ScenarioResult]) -> DrawResult {
    let rows = scenarios.len().max(1);
    let measured = || scenarios.iter().flat_map(|s| [s.p50_ms, s.p99_ms]).flatten();
    let low = measured().fold(f64::INFINITY, f64::min);
    let high = measured().fold(0.0_f64, f64::max);
    // Half the fastest to twice the slowest; 0.1 to 100 ms with no data.
    let (x_min, x_max) = if high > 0.0 {
        ((low / 2.0).max(0.001), high * 2.0)
    } else {
        (0.1, 100.0)
    };
    let panel = Panel {
        caption: "Tally latency per operation (ms, log scale; lower is better)",
        x_desc: "milliseconds",
        bars: [
            Bar {
                label: "p50",
                value: |s| s.p50_ms,
                color: P50_COLOR,
            },
            Bar {
                label: "p99",
                value: |s| s.p99_ms,
                color: P99_COLOR,
            },
        ],
        base: x_min,
        decimals: 1,
    };
    draw_panel(area, scenarios, &panel, (x_min..x_max).log_scale(), |chart| {
        let unmeasured = scenarios
            .iter()
            .enumerate()
            .filter(|(_, s)| s.p50_ms.is_none() && s.p99_ms.is_none());
        chart.draw_series(unmeasured.map(|(i, _)| {
            Text::new(
                " measured as a whole",
                (x_min, row_y(i, rows) + 0.1),
                (FONT, 13).into_font(),
            )
        }))?;
        Ok(())
    })
}

/// Draws `panel` over the x range `x`, then what `extra` adds, then the legend.
fn draw_panel<X>(
    area: &Area<'_>,
    scenarios: &[ScenarioResult],
    panel: &Panel,
    x: X,
    extra: impl FnOnce(&mut Chart<'_, '_, X::CoordDescType>) -> DrawResult,
) -> DrawResult
where
    X: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
{
    let rows = scenarios.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(panel.caption, (FONT, 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(NAMES_PX)
        .build_cartesian_2d(x, -0.5..rows as f64 - 0.5)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(name_ticks(rows))
        .y_label_formatter(&|y| name_of(scenarios, *y))
        .x_label_formatter(&|x| axis_number(*x))
        .x_desc(panel.x_desc)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 14))
        .draw()?;
    for (bar, offset) in panel.bars.iter().zip([0.2, -0.2]) {
        let color = bar.color;
        let rows_with_values = || {
            scenarios
                .iter()
                .enumerate()
                .filter_map(move |(i, s)| (bar.value)(s).map(|v| (row_y(i, rows) + offset, v.max(panel.base))))
        };
        chart
            .draw_series(
                rows_with_values()
                    .map(|(y, v)| Rectangle::new([(panel.base, y - 0.17), (v, y + 0.17)], color.filled())),
            )?
            .label(bar.label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 16, y + 6)], color.filled()));
        chart.draw_series(rows_with_values().map(|(y, v)| {
            Text::new(
                format!(" {v:.decimals$}", decimals = panel.decimals),
                (v, y + 0.12),
                (FONT, 13).into_font(),
            )
        }))?;
    }
    extra(&mut chart)?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font((FONT, 14))
        .draw()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::measurement::Measurement;
    use crate::report::timestamp_now;

    fn row(name: &str, limit: f64, baseline: Option<f64>, tally: f64, p99_ms: Option<f64>) -> ScenarioResult {
        let measured = |ops_per_s: f64| Measurement::throughput((ops_per_s * 10.0) as u64, 10.0, BTreeMap::new());
        let mut row = ScenarioResult::compare(name, "ops/s", &measured(limit), &measured(tally));
        if let Some(baseline) = baseline {
            row = row.with_baseline(&measured(baseline));
        }
        row.p50_ms = p99_ms.map(|p| p / 3.0);
        row.p99_ms = p99_ms;
        row
    }

    #[test]
    fn the_chart_is_a_png_of_the_planned_size_with_something_drawn_in_each_colour() {
        let mut report = Report::new("test machine".into(), timestamp_now());
        report.scenarios = vec![
            row("append-1", 2600.0, None, 550.0, Some(3.2)),
            row("deposits-64", 5800.0, Some(1500.0), 5600.0, Some(23.4)),
            row("hot-account", 2500.0, Some(300.0), 7400.0, Some(12.3)),
            row("relay", 89000.0, None, 13000.0, None),
        ];
        let dir = std::env::temp_dir().join(format!("tally-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("report.png");

        render_png(&report, &path).unwrap();

        let image = image::open(&path).unwrap().to_rgb8();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(image.width(), WIDTH_PX);
        assert_eq!(image.height(), 2 * (PANEL_EXTRA_PX + 4 * ROW_PX) + 40);
        for color in [LIMIT_COLOR, BASELINE_COLOR, P50_COLOR, P99_COLOR] {
            let pixels = image.pixels().filter(|p| p.0 == [color.0, color.1, color.2]).count();
            assert!(pixels > 500, "only {pixels} pixels of {color:?}");
        }
        // The scenario names were drawn: dark pixels left of the axes, where nothing else is.
        let names = (0..NAMES_PX - 30)
            .flat_map(|x| (40..40 + PANEL_EXTRA_PX + 4 * ROW_PX).map(move |y| (x, y)))
            .filter(|&(x, y)| image.get_pixel(x, y).0.iter().all(|c| *c < 80))
            .count();
        assert!(names > 100, "only {names} dark pixels where the names go");
    }

    #[test]
    fn axis_numbers_drop_float_noise_and_trailing_zeros() {
        assert_eq!(axis_number(2.500_000_000_000_000_4), "2.5");
        assert_eq!(axis_number(10.0), "10");
        assert_eq!(axis_number(0.125), "0.125");
        assert_eq!(axis_number(0.0), "0");
    }

    #[test]
    fn row_names_sit_on_whole_key_points_only() {
        let scenarios = vec![row("first", 1.0, None, 1.0, None), row("second", 1.0, None, 1.0, None)];
        assert_eq!(name_of(&scenarios, 1.0), "first");
        assert_eq!(name_of(&scenarios, 0.0), "second");
        assert_eq!(name_of(&scenarios, 0.5), "");
        assert_eq!(name_of(&scenarios, 2.0), "");
    }
}
