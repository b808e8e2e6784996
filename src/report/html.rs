//! The single-file HTML page: inline CSS and SVG, no scripts, no network, every piece of study
//! text escaped.

use std::fmt::Write as _;

use super::tables::html_escape;
use super::Section;

const CSS: &str = "
body { font-family: 'DejaVu Sans', Verdana, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
nav ol { columns: 2; }
.status { background: #f4f4f4; padding: .6em 1em; border-left: 4px solid #0072B2; }
.status.partial { border-left-color: #D55E00; background: #fff4ec; }
figure { margin: 1.5em 0; } figure svg { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .9em; color: #555; }
table { border-collapse: collapse; margin: 1em 0; font-size: .9em; }
th, td { padding: .25em .6em; border-bottom: 1px solid #ddd; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
thead th { border-bottom: 2px solid #444; }
.tcap { font-weight: bold; margin-top: 1.2em; }
pre { background: #f8f8f8; padding: 1em; overflow-x: auto; font-size: .85em; }
";

pub(super) fn page(title: &str, status: &str, partial: bool, sections: &[Section]) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<h1>{}</h1>\n",
        html_escape(title),
        html_escape(title)
    );
    let _ = writeln!(
        out,
        "<p class=\"status{}\" id=\"status\">{}</p>",
        if partial { " partial" } else { "" },
        html_escape(status)
    );
    out.push_str("<nav id=\"toc\"><h2>Contents</h2><ol>\n");
    for s in sections {
        let _ = writeln!(
            out,
            "<li><a href=\"#{}\">{}</a></li>",
            html_escape(&s.id),
            html_escape(&s.title)
        );
    }
    out.push_str("</ol></nav>\n");
    for s in sections {
        let _ = writeln!(
            out,
            "<section id=\"{}\">\n<h2>{}</h2>",
            html_escape(&s.id),
            html_escape(&s.title)
        );
        for n in &s.notes {
            let _ = writeln!(out, "<p>{}</p>", html_escape(n));
        }
        for f in &s.figures {
            // plotters' SVG escapes its text; it is inlined as markup.
            let _ = writeln!(
                out,
                "<figure id=\"fig-{}\">\n{}\n<figcaption>{}</figcaption>\n</figure>",
                html_escape(&f.stem),
                f.figure.svg,
                html_escape(&f.caption)
            );
        }
        for (name, t) in &s.tables {
            let _ = writeln!(out, "<p class=\"tcap\">{}</p>", html_escape(name));
            out.push_str(&t.html());
        }
        for p in &s.pre {
            let _ = writeln!(out, "<pre>{}</pre>", html_escape(p));
        }
        out.push_str("</section>\n");
    }
    out.push_str("</body>\n</html>\n");
    out
}
