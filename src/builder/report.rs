//! What an image or a layer keeps of how it was made: each stage's record (its steps and
//! phases with their times, its screen's timeline, the answer file it booted with) in
//! `report/STAGE.json` beside `report/STAGE/`, and one page of them all, `report.html`, listed
//! with its screenshots in `nix-support/hydra-build-products`.
//!
//!   media   -> $out/report/media.json
//!   install -> $out/report/install.json, report/install/ (timeline, answer file)
//!   suspend -> the image: report/{media,install,suspend}.json, report/suspend/,
//!              report/install -> the installed stage's folder, report.html
//!   layer   -> report/layer.json, report/layer/, report.html (linking the base's)

use super::progress::Step;
use super::{io, BuilderError, Progress};
use crate::vm::screen::{self, minutes_seconds};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The report's folder in an output.
pub const REPORT_DIR: &str = "report";
/// The page, in an output.
pub const REPORT_PAGE: &str = "report.html";

/// One screenshot of a stage's timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShotRecord {
    /// Seconds since the VM's screens were first asked for.
    pub at: f64,
    /// Relative to the output's `report/`.
    pub file: String,
}

/// One stage, as `report/STAGE.json` keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StageRecord {
    pub stage: String,
    pub seconds: f64,
    pub steps: Vec<Step>,
    #[serde(default)]
    pub shots: Vec<ShotRecord>,
    /// The answer file the installer booted with, relative to `report/`.
    #[serde(default)]
    pub answer_file: Option<String>,
}

/// The folder of `stage`'s screenshots in `out`.
pub fn shots_dir(out: &Path, stage: &str) -> PathBuf {
    out.join(REPORT_DIR).join(stage)
}

/// Where a stage's timeline is kept while it runs: in its work folder, which `nix-build -K`
/// keeps when the stage fails; [`save_stage`] copies it into the output.
pub fn timeline_dir(work: &Path) -> PathBuf {
    work.join("timeline")
}

/// Writes `out/report/STAGE.json`: the stage's journal, its timeline (the screenshots the VM's
/// screens kept in `timeline`, copied into [`shots_dir`]), and a copy of `answer_file`.
pub fn save_stage(
    out: &Path,
    stage: &str,
    progress: &Progress,
    answer_file: Option<&Path>,
    timeline: Option<&Path>,
) -> Result<StageRecord, BuilderError> {
    let report = out.join(REPORT_DIR);
    if let Some(from) = timeline {
        let to = shots_dir(out, stage);
        for (_, shot) in timeline_in(from) {
            std::fs::create_dir_all(&to).map_err(io(format!("creating {}", to.display())))?;
            let target = to.join(shot.file_name().unwrap_or_default());
            std::fs::copy(&shot, &target).map_err(io(format!("copying {} to {}", shot.display(), target.display())))?;
        }
    }
    let relative = |p: &Path| p.strip_prefix(&report).unwrap_or(p).display().to_string();
    let shots = timeline_in(&shots_dir(out, stage))
        .into_iter()
        .map(|(at, path)| ShotRecord { at: at.as_secs_f64(), file: relative(&path) })
        .collect();
    let answer = match answer_file {
        Some(from) => {
            let dir = shots_dir(out, stage);
            std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
            let to = dir.join(from.file_name().unwrap_or("answer-file".as_ref()));
            std::fs::copy(from, &to).map_err(io(format!("copying {} to {}", from.display(), to.display())))?;
            Some(relative(&to))
        }
        None => None,
    };
    let record = StageRecord {
        stage: stage.to_owned(),
        seconds: progress.elapsed(),
        steps: progress.journal(),
        shots,
        answer_file: answer,
    };
    write_record(&report, &record)?;
    Ok(record)
}

/// The timeline's screenshots in `dir`, in time order, with their times (from their names:
/// see `screen::Timeline`).
fn timeline_in(dir: &Path) -> Vec<(Duration, PathBuf)> {
    let mut shots: Vec<(Duration, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let path = e.path();
            Some((screen::timeline_time(path.file_name()?.to_str()?)?, path))
        })
        .collect();
    shots.sort();
    shots
}

fn write_record(report: &Path, record: &StageRecord) -> Result<(), BuilderError> {
    std::fs::create_dir_all(report).map_err(io(format!("creating {}", report.display())))?;
    let path = report.join(format!("{}.json", record.stage));
    let json = serde_json::to_string_pretty(record).map_err(io(format!("writing {}", path.display())))?;
    std::fs::write(&path, json).map_err(io(format!("writing {}", path.display())))
}

/// The record of `stage` in `from` (an earlier stage's output), if it kept one: a stage of an
/// older nix-winvm did not, and its image still builds.
pub fn load_stage(from: &Path, stage: &str) -> Option<StageRecord> {
    let text = std::fs::read_to_string(from.join(REPORT_DIR).join(format!("{stage}.json"))).ok()?;
    serde_json::from_str(&text).ok()
}

/// An earlier stage's record brought into `out`: its JSON copied, its screenshots' folder
/// linked (they stay in the earlier stage's output, which the image's closure holds).
pub fn bring_stage(from: &Path, out: &Path, stage: &str) -> Result<Option<StageRecord>, BuilderError> {
    let Some(record) = load_stage(from, stage) else { return Ok(None) };
    write_record(&out.join(REPORT_DIR), &record)?;
    let dir = shots_dir(from, stage);
    if dir.is_dir() {
        let link = shots_dir(out, stage);
        std::os::unix::fs::symlink(&dir, &link).map_err(io(format!("linking {}", link.display())))?;
    }
    Ok(Some(record))
}

/// What the page says the output is.
pub struct PageHeading<'a> {
    /// "image of the standin guest", "layer 2 on /nix/store/…".
    pub what: String,
    /// The report of the image this one is made on (a layer's base).
    pub base: Option<&'a Path>,
}

/// Writes `out/report.html` of `records`, and lists it with its screenshots in
/// `out/nix-support/hydra-build-products`.
pub fn write_page(out: &Path, heading: &PageHeading, records: &[StageRecord]) -> Result<(), BuilderError> {
    let page = out.join(REPORT_PAGE);
    std::fs::write(&page, render(out, heading, records)).map_err(io(format!("writing {}", page.display())))?;
    let support = out.join("nix-support");
    std::fs::create_dir_all(&support).map_err(io(format!("creating {}", support.display())))?;
    let mut products = format!("doc report {}\n", page.display());
    for record in records {
        for shot in &record.shots {
            let _ = writeln!(products, "file screenshot {}", out.join(REPORT_DIR).join(&shot.file).display());
        }
        if let Some(answer) = &record.answer_file {
            let _ = writeln!(products, "file answer-file {}", out.join(REPORT_DIR).join(answer).display());
        }
    }
    let list = support.join("hydra-build-products");
    std::fs::write(&list, products).map_err(io(format!("writing {}", list.display())))
}

const STYLE: &str = "body{font:15px/1.4 sans-serif;margin:2em;color:#222;background:#fff}\
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em}\
table{border-collapse:collapse}td,th{padding:2px 10px;text-align:left;vertical-align:top;border-bottom:1px solid #ddd}\
td.n{text-align:right;font-variant-numeric:tabular-nums}tr.phase td{font-weight:bold}\
.shots{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0;width:320px}\
figure img{width:320px;height:auto;display:block;border:1px solid #888}\
figcaption{font-size:.85em;color:#555}pre{background:#f4f4f4;padding:1em;overflow:auto;font-size:.85em}";

fn render(out: &Path, heading: &PageHeading, records: &[StageRecord]) -> String {
    let mut h = String::new();
    let title = format!("nix-winvm: {}", heading.what);
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{STYLE}</style></head><body>\n<h1>{}</h1>\n<p>{}</p>\n",
        escape(&title),
        escape(&title),
        escape(&out.display().to_string())
    );
    if let Some(base) = heading.base {
        let page = base.join(REPORT_PAGE);
        let _ = writeln!(
            h,
            "<p>Made on <a href=\"{}\">{}</a>.</p>",
            escape_attr(&file_url(&page)),
            escape(&base.display().to_string())
        );
    }
    h.push_str("<h2>Time per phase</h2>\n<table><tr><th>stage</th><th>phase</th><th>began at</th><th>took</th></tr>\n");
    for r in records {
        for (phase, began, took) in phases(r) {
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{}</td><td class=\"n\">{began:.1} s</td><td class=\"n\">{took:.1} s</td></tr>",
                escape(&r.stage),
                escape(&phase)
            );
        }
        let _ = writeln!(
            h,
            "<tr class=\"phase\"><td>{}</td><td>the whole stage</td><td></td><td class=\"n\">{:.1} s ({})</td></tr>",
            escape(&r.stage),
            r.seconds,
            minutes_seconds(Duration::from_secs_f64(r.seconds.max(0.0)))
        );
    }
    h.push_str("</table>\n");
    for r in records.iter().filter(|r| !r.shots.is_empty()) {
        let _ = writeln!(h, "<h2>The screen during {}</h2>\n<div class=\"shots\">", escape(&r.stage));
        for s in &r.shots {
            let src = format!("{REPORT_DIR}/{}", s.file);
            let when = minutes_seconds(Duration::from_secs_f64(s.at.max(0.0)));
            let _ = writeln!(
                h,
                "<figure><a href=\"{0}\"><img src=\"{0}\" alt=\"the screen during {1} after {2}\"></a><figcaption>{1}, after {2}</figcaption></figure>",
                escape_attr(&src),
                escape(&r.stage),
                when
            );
        }
        h.push_str("</div>\n");
    }
    for r in records {
        let _ = writeln!(h, "<h2>Steps of {}</h2>\n<table><tr><th>at</th><th>step</th></tr>", escape(&r.stage));
        for s in &r.steps {
            let class = if s.phase { " class=\"phase\"" } else { "" };
            let _ = writeln!(h, "<tr{class}><td class=\"n\">{:.2} s</td><td>{}</td></tr>", s.at, escape(&s.text));
        }
        h.push_str("</table>\n");
    }
    for r in records {
        let Some(answer) = &r.answer_file else { continue };
        let text = std::fs::read(out.join(REPORT_DIR).join(answer))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("(unreadable: {e})"));
        let _ = writeln!(
            h,
            "<h2>The answer file of {}</h2>\n<p><a href=\"{REPORT_DIR}/{}\">{}</a></p>\n<pre>{}</pre>",
            escape(&r.stage),
            escape_attr(answer),
            escape(answer),
            escape(&text)
        );
    }
    h.push_str("</body></html>\n");
    h
}

/// Each phase of a stage: its name, when it began and how long it took (until the next phase,
/// or the stage's end).
fn phases(r: &StageRecord) -> Vec<(String, f64, f64)> {
    let marks: Vec<&Step> = r.steps.iter().filter(|s| s.phase).collect();
    marks
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let end = marks.get(i + 1).map_or(r.seconds, |n| n.at);
            (s.text.clone(), s.at, (end - s.at).max(0.0))
        })
        .collect()
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A relative link: each path segment percent-encoded where a URL needs it, then escaped.
fn escape_attr(path: &str) -> String {
    let mut url = String::new();
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"/-_.~".contains(&b) {
            url.push(b as char);
        } else {
            let _ = write!(url, "%{b:02X}");
        }
    }
    escape(&url)
}

fn file_url(path: &Path) -> String {
    format!("file://{}", path.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> StageRecord {
        StageRecord {
            stage: "install".into(),
            seconds: 100.0,
            steps: vec![
                Step { at: 0.5, text: "install".into(), phase: true },
                Step { at: 1.0, text: "installer VM started".into(), phase: false },
                Step { at: 40.0, text: "install: copying <the> system".into(), phase: true },
            ],
            shots: vec![ShotRecord { at: 5.0, file: "install/installer-0000m05s.png".into() }],
            answer_file: Some("install/autounattend.xml".into()),
        }
    }

    #[test]
    fn phases_last_until_the_next_or_the_stages_end() {
        assert_eq!(
            phases(&record()),
            [("install".to_string(), 0.5, 39.5), ("install: copying <the> system".to_string(), 40.0, 60.0)]
        );
    }

    #[test]
    fn the_page_shows_every_part_escaped_and_lists_its_files_for_hydra() {
        let out = tempfile::tempdir().unwrap();
        let dir = shots_dir(out.path(), "install");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("autounattend.xml"), "<unattend>&</unattend>").unwrap();
        let heading = PageHeading { what: "image of the standin guest".into(), base: None };
        write_page(out.path(), &heading, &[record()]).unwrap();
        let page = std::fs::read_to_string(out.path().join(REPORT_PAGE)).unwrap();
        assert!(page.contains("<img src=\"report/install/installer-0000m05s.png\""), "{page}");
        assert!(page.contains("install: copying &lt;the&gt; system"));
        assert!(page.contains("<td class=\"n\">39.5 s</td>"), "the first phase's time");
        assert!(page.contains("&lt;unattend&gt;&amp;&lt;/unattend&gt;"), "the answer file, escaped");
        let products = std::fs::read_to_string(out.path().join("nix-support/hydra-build-products")).unwrap();
        let lines: Vec<&str> = products.lines().collect();
        assert_eq!(lines[0], format!("doc report {}", out.path().join(REPORT_PAGE).display()));
        assert_eq!(lines[1], format!("file screenshot {}", dir.join("installer-0000m05s.png").display()));
        assert_eq!(lines[2], format!("file answer-file {}", dir.join("autounattend.xml").display()));
    }

    #[test]
    fn links_are_encoded() {
        assert_eq!(escape_attr("install/a b&c.png"), "install/a%20b%26c.png");
    }
}
