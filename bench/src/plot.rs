//! PNG plots of a run (plotters' bitmap backend, encoded with the `png` crate): received
//! rate against the number of Services installed, one line per device and the generator's
//! ceiling; new flows per second likewise; latency percentiles per device at the latency
//! run's rate. Text needs a TrueType font: the first of a few common ones found on the
//! machine (`fonts-dejavu-core` on Debian); without one, no plot is drawn and the caller is
//! told.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::dut::DutKind;
use crate::measure::RunResult;
use crate::report::{at_rate, duts, latency_rates, median, median_latency, median_pps};
use crate::suite::{Point, Results};

const WIDTH: u32 = 1100;
const HEIGHT: u32 = 620;
/// Width of the legend panel right of the chart, so no line hides behind it.
const LEGEND: u32 = 260;
const FONT: &str = "sans-serif";

/// Fonts tried, in order.
pub const FONTS: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/lato/Lato-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];

/// Registers the first font of [`FONTS`] that exists; returns its path.
pub fn load_font() -> Option<&'static str> {
    static LOADED: std::sync::OnceLock<Option<&'static str>> = std::sync::OnceLock::new();
    *LOADED.get_or_init(|| {
        for path in FONTS {
            if let Ok(bytes) = std::fs::read(path) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font(FONT, FontStyle::Normal, bytes).is_ok() {
                    return Some(path);
                }
            }
        }
        None
    })
}

fn color(d: DutKind) -> RGBColor {
    match d {
        DutKind::Kxdp => RGBColor(0xd6, 0x27, 0x28),
        DutKind::KxdpAdaptive => RGBColor(0xff, 0x7f, 0x0e),
        DutKind::Iptables => RGBColor(0x1f, 0x77, 0xb4),
        DutKind::IptablesLegacy => RGBColor(0x17, 0xbe, 0xcf),
        DutKind::Nftables => RGBColor(0x2c, 0xa0, 0x2c),
        DutKind::XdpForwarder => RGBColor(0x94, 0x67, 0xbd),
    }
}

const CEILING: RGBColor = RGBColor(0x7f, 0x7f, 0x7f);

fn write_png(path: &Path, buf: &[u8]) -> anyhow::Result<()> {
    let file = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), WIDTH, HEIGHT);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header()?;
    w.write_image_data(buf)?;
    Ok(())
}

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("plot: {e}")
}

/// Lines saying which devices were not run at which Service counts.
fn not_run_notes(res: &Results) -> Vec<String> {
    let mut out = Vec::new();
    for d in duts(res) {
        let at: Vec<String> = res
            .points
            .iter()
            .filter(|p| {
                p.setup
                    .iter()
                    .any(|s| s.dut == d.name() && s.not_run.is_some())
            })
            .map(|p| crate::report::thousands(f64::from(p.services)))
            .collect();
        if !at.is_empty() {
            out.push(format!("{}: not run at {}", d.short(), at.join(", ")));
        }
    }
    if !out.is_empty() {
        out.push("(tables did not load in time)".into());
    }
    out
}

/// Draws `entries` (label, colour, dashed) as a legend down the panel `area`, then `notes`.
fn legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    entries: &[Entry],
    notes: &[String],
) -> anyhow::Result<()> {
    let top = 80;
    for (i, (label, c, dashed)) in entries.iter().enumerate() {
        let y = top + 28 * i as i32;
        if *dashed {
            for x in (10..40).step_by(10) {
                area.draw(&PathElement::new(
                    vec![(x, y), (x + 6, y)],
                    c.stroke_width(3),
                ))
                .map_err(err)?;
            }
        } else {
            area.draw(&PathElement::new(vec![(10, y), (40, y)], c.stroke_width(3)))
                .map_err(err)?;
            area.draw(&Circle::new((25, y), 5, c.filled()))
                .map_err(err)?;
        }
        area.draw(&Text::new(label.clone(), (50, y - 8), (FONT, 15)))
            .map_err(err)?;
    }
    let below = top + 28 * entries.len() as i32 + 20;
    for (i, n) in notes.iter().enumerate() {
        area.draw(&Text::new(
            n.clone(),
            (10, below + 20 * i as i32),
            (FONT, 13),
        ))
        .map_err(err)?;
    }
    Ok(())
}

fn short_pps(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2} M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.0} k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// A legend entry: label, colour, dashed.
type Entry = (String, RGBColor, bool);

/// Writes a [`WIDTH`] × [`HEIGHT`] PNG to `path`: on white, the chart `draw` makes in the
/// area left of the legend panel, then in the panel the entries `draw` returns and `notes`.
fn png_with_legend(
    path: &Path,
    notes: &[String],
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> anyhow::Result<Vec<Entry>>,
) -> anyhow::Result<()> {
    let mut buf = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (left, right) = root.split_horizontally(WIDTH - LEGEND);
        let entries = draw(&left)?;
        legend(&right, &entries, notes)?;
        root.present().map_err(err)?;
    }
    write_png(path, &buf)
}

/// Draws `pts` on `chart` as a line in `c` with a dot at every point (the legend's solid
/// entry).
fn draw_line<DB, CT>(
    chart: &mut ChartContext<'_, DB, CT>,
    pts: &[(f64, f64)],
    c: RGBColor,
) -> anyhow::Result<()>
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
    CT: CoordTranslate<From = (f64, f64)>,
{
    chart
        .draw_series(LineSeries::new(pts.to_vec(), c.stroke_width(3)))
        .map_err(err)?;
    chart
        .draw_series(pts.iter().map(|&p| Circle::new(p, 5, c.filled())))
        .map_err(err)?;
    Ok(())
}

/// Rate against Services, one line per device, the ceiling dashed.
fn rate_plot(
    res: &Results,
    path: &Path,
    title: &str,
    pick: fn(&Point) -> &Vec<RunResult>,
    ceiling: Option<f64>,
) -> anyhow::Result<bool> {
    let series: Vec<(DutKind, Vec<(f64, f64)>)> = duts(res)
        .into_iter()
        .map(|d| {
            let pts = res
                .points
                .iter()
                .filter_map(|p| Some((f64::from(p.services), median_pps(pick(p), d.name())?)))
                .collect();
            (d, pts)
        })
        .collect();
    if series.iter().all(|(_, p)| p.is_empty()) {
        return Ok(false);
    }
    let ymax = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .chain(ceiling)
        .fold(0.0, f64::max)
        * 1.15;
    png_with_legend(path, &not_run_notes(res), |left| {
        let mut entries = Vec::new();
        let mut chart = ChartBuilder::on(left)
            .caption(title, (FONT, 22))
            .margin(20)
            .x_label_area_size(50)
            .y_label_area_size(90)
            .build_cartesian_2d((0.7f64..150_000f64).log_scale(), 0f64..ymax.max(1.0))
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("Services installed (10 endpoints each)")
            .y_desc("received packets per second")
            .x_label_formatter(&|x| {
                if *x >= 1000.0 {
                    format!("{:.0}k", x / 1000.0)
                } else {
                    format!("{x:.0}")
                }
            })
            .y_label_formatter(&|y| short_pps(*y))
            .label_style((FONT, 15))
            .draw()
            .map_err(err)?;
        if let Some(c) = ceiling {
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(0.7, c), (150_000.0, c)],
                    8,
                    6,
                    CEILING.stroke_width(2),
                ))
                .map_err(err)?;
            entries.push(("generator ceiling (no device)".to_string(), CEILING, true));
        }
        for (d, pts) in &series {
            if pts.is_empty() {
                continue;
            }
            let c = color(*d);
            draw_line(&mut chart, pts, c)?;
            entries.push((d.short().to_string(), c, false));
        }
        Ok(entries)
    })?;
    Ok(true)
}

/// Latency percentiles of every device at one Service count and one rate.
fn latency_plot(res: &Results, p: &Point, rate: u64, path: &Path) -> anyhow::Result<bool> {
    let rates = latency_rates(res);
    let (ceiling, latency) = (
        at_rate(&res.ceiling_latency, &rates, rate),
        at_rate(&p.latency, &rates, rate),
    );
    type Pick = fn(&RunResult) -> u64;
    let picks: [(&str, Pick); 5] = [
        ("p50", |r| r.latency_ns.p50),
        ("p90", |r| r.latency_ns.p90),
        ("p99", |r| r.latency_ns.p99),
        ("p99.9", |r| r.latency_ns.p999),
        ("max", |r| r.latency_ns.max),
    ];
    /// A line: its label, colour and (percentile index, µs) points.
    type Line = (String, RGBColor, Vec<(f64, f64)>);
    let mut series: Vec<Line> = Vec::new();
    let line = |runs: &[RunResult], key: &str| -> Vec<(f64, f64)> {
        picks
            .iter()
            .enumerate()
            .filter_map(|(i, (_, f))| Some((i as f64, median_latency(runs, key, *f)? / 1000.0)))
            .collect()
    };
    series.push((
        "generator → sink (no device)".into(),
        CEILING,
        line(&ceiling, "ceiling"),
    ));
    for d in duts(res) {
        series.push((d.short().into(), color(d), line(&latency, d.name())));
    }
    let ymax = series
        .iter()
        .flat_map(|(_, _, p)| p.iter().map(|(_, y)| *y))
        .fold(1.0, f64::max)
        * 2.0;
    let ymin = series
        .iter()
        .flat_map(|(_, _, p)| p.iter().map(|(_, y)| *y))
        .fold(f64::INFINITY, f64::min)
        .clamp(0.1, 10.0)
        / 2.0;
    let title = format!(
        "One-way latency at {} pps, {} Services",
        crate::report::thousands(rate as f64),
        crate::report::thousands(f64::from(p.services))
    );
    png_with_legend(path, &[], |left| {
        let mut entries = Vec::new();
        let mut chart = ChartBuilder::on(left)
            .caption(title, (FONT, 22))
            .margin(20)
            .x_label_area_size(50)
            .y_label_area_size(80)
            .build_cartesian_2d(-0.3f64..4.3f64, (ymin..ymax).log_scale())
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("µs (log scale)")
            .x_labels(5)
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 0.05 && (0.0..=4.0).contains(&i) {
                    picks[i as usize].0.to_string()
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|y| format!("{y:.0}"))
            .label_style((FONT, 15))
            .draw()
            .map_err(err)?;
        for (name, c, pts) in &series {
            if pts.is_empty() {
                continue;
            }
            draw_line(&mut chart, pts, *c)?;
            entries.push((name.clone(), *c, false));
        }
        Ok(entries)
    })?;
    Ok(true)
}

/// Draws every plot of `res` into `dir`; returns the files written.
pub fn all(res: &Results, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if load_font().is_none() {
        anyhow::bail!(
            "no TrueType font found (tried {}): install fonts-dejavu-core for the plots",
            FONTS.join(", ")
        );
    }
    let mut out = Vec::new();
    let ceiling = median(res.ceiling.iter().map(|r| r.received_pps));
    let size = res.plan.as_ref().map_or(64, |p| p.size);
    let f = dir.join("throughput-vs-services.png");
    if rate_plot(
        res,
        &f,
        &format!("{size}-byte UDP to one ClusterIP, DNAT + masquerade, flat out"),
        |p| &p.throughput,
        ceiling,
    )? {
        out.push(f);
    }
    let f = dir.join("new-flows-vs-services.png");
    if res.points.iter().any(|p| !p.new_flows.is_empty())
        && rate_plot(
            res,
            &f,
            "New flows per second (every frame a new 5-tuple)",
            |p| &p.new_flows,
            None,
        )?
    {
        out.push(f);
    }
    let rates = latency_rates(res);
    for p in res.points.iter().filter(|p| !p.latency.is_empty()) {
        for &rate in &rates {
            // One rate keeps the file name of the runs before the rate list.
            let f = if rates.len() == 1 {
                dir.join(format!("latency-{}-services.png", p.services))
            } else {
                dir.join(format!("latency-{}-services-{rate}-pps.png", p.services))
            };
            if latency_plot(res, p, rate, &f)? {
                out.push(f);
            }
        }
        if rates.len() > 1 {
            let f = dir.join(format!("latency-vs-rate-{}-services.png", p.services));
            if latency_rate_plot(res, p, &f)? {
                out.push(f);
            }
        }
    }
    Ok(out)
}

/// p50, p99 and p99.9 of every device against the offered rate at one Service count:
/// three charts, one above the other, log scales.
fn latency_rate_plot(res: &Results, p: &Point, path: &Path) -> anyhow::Result<bool> {
    type Pick = fn(&RunResult) -> u64;
    let picks: [(&str, Pick); 3] = [
        ("p50", |r| r.latency_ns.p50),
        ("p99", |r| r.latency_ns.p99),
        ("p99.9", |r| r.latency_ns.p999),
    ];
    let rates = latency_rates(res);
    /// A device's (rate, µs) points.
    type Line = (DutKind, Vec<(f64, f64)>);
    // Per percentile, per device.
    let series: Vec<Vec<Line>> = picks
        .iter()
        .map(|(_, f)| {
            duts(res)
                .into_iter()
                .map(|d| {
                    let pts = rates
                        .iter()
                        .filter_map(|&r| {
                            let runs = at_rate(&p.latency, &rates, r);
                            Some((r as f64, median_latency(&runs, d.name(), *f)? / 1000.0))
                        })
                        .collect();
                    (d, pts)
                })
                .collect()
        })
        .collect();
    let all = || series.iter().flatten().flat_map(|(_, p)| p.iter().copied());
    if all().next().is_none() {
        return Ok(false);
    }
    let (xmin, xmax) = (
        rates.iter().copied().min().unwrap_or(1) as f64 / 2.0,
        rates.iter().copied().max().unwrap_or(1) as f64 * 2.0,
    );
    let ymax = all().map(|(_, y)| y).fold(1.0, f64::max) * 2.0;
    let ymin = all()
        .map(|(_, y)| y)
        .fold(f64::INFINITY, f64::min)
        .clamp(0.1, 10.0)
        / 2.0;
    png_with_legend(path, &[], |left| {
        let mut entries: Vec<Entry> = Vec::new();
        let panels = left.split_evenly((3, 1));
        for (((name, _), per_dut), panel) in picks.iter().zip(&series).zip(&panels) {
            let mut chart = ChartBuilder::on(panel)
                .caption(
                    format!(
                        "One-way latency {name} against the rate, {} Services",
                        crate::report::thousands(f64::from(p.services))
                    ),
                    (FONT, 18),
                )
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(80)
                .build_cartesian_2d((xmin..xmax).log_scale(), (ymin..ymax).log_scale())
                .map_err(err)?;
            chart
                .configure_mesh()
                .x_desc("offered packets per second (log scale)")
                .y_desc("µs (log scale)")
                .x_label_formatter(&|x| short_pps(*x))
                .y_label_formatter(&|y| format!("{y:.0}"))
                .label_style((FONT, 13))
                .draw()
                .map_err(err)?;
            for (d, pts) in per_dut {
                if pts.is_empty() {
                    continue;
                }
                draw_line(&mut chart, pts, color(*d))?;
                if !entries.iter().any(|e| e.0 == d.short()) {
                    entries.push((d.short().to_string(), color(*d), false));
                }
            }
        }
        Ok(entries)
    })?;
    Ok(true)
}
