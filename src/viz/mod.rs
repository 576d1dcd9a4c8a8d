//! Pictures of what a search found and how runs went: cell diagrams (Graphviz DOT laid out and drawn as
//! SVG in-process by `layout-rs`), charts (SVG by `plotters`), and PNG renderings of any of them (`resvg`).
//! Nothing here needs a Graphviz binary or a browser.
pub mod cell;
pub mod plot;

use anyhow::{anyhow, Context, Result};
use std::path::Path;
use std::sync::OnceLock;

/// Lays out a Graphviz DOT graph and draws it as SVG (layout-rs: its own layered layout, no Graphviz).
pub fn dot_to_svg(dot: &str) -> Result<String> {
    let mut parser = layout::gv::DotParser::new(dot);
    let graph = parser.process().map_err(|e| anyhow!("the DOT text does not parse: {e}"))?;
    let mut builder = layout::gv::GraphBuilder::new();
    builder.visit_graph(&graph);
    let mut visual = builder.get();
    let mut svg = layout::backends::svg::SVGWriter::new();
    visual.do_it(false, false, false, &mut svg);
    Ok(svg.finalize())
}

/// The fonts resvg draws text with: the system's, with the generic families pointed at fonts that exist.
fn fontdb() -> &'static std::sync::Arc<resvg::usvg::fontdb::Database> {
    static DB: OnceLock<std::sync::Arc<resvg::usvg::fontdb::Database>> = OnceLock::new();
    DB.get_or_init(|| {
        let mut db = resvg::usvg::fontdb::Database::new();
        db.load_system_fonts();
        let families: Vec<String> =
            db.faces().flat_map(|f| f.families.iter().map(|(name, _)| name.clone()).collect::<Vec<_>>()).collect();
        let pick = |wanted: &[&str]| {
            wanted
                .iter()
                .find(|w| families.iter().any(|f| f == *w))
                .map(|s| s.to_string())
                .or(families.first().cloned())
        };
        if let Some(sans) = pick(&["DejaVu Sans", "Liberation Sans", "Arial", "Helvetica", "Noto Sans"]) {
            db.set_sans_serif_family(sans);
        }
        if let Some(serif) = pick(&["DejaVu Serif", "Liberation Serif", "Times New Roman", "Times", "Noto Serif"]) {
            db.set_serif_family(serif);
        }
        if let Some(mono) = pick(&["DejaVu Sans Mono", "Liberation Mono", "Courier New", "Noto Sans Mono"]) {
            db.set_monospace_family(mono);
        }
        if db.is_empty() {
            eprintln!(
                "warning: no fonts found on this system: PNG pictures will have no text (the SVG files are \
                 complete). Install a font package, e.g. `apt-get install fonts-dejavu-core`."
            );
        }
        std::sync::Arc::new(db)
    })
}

/// Renders SVG text to PNG bytes at `scale` times its own size.
pub fn svg_to_png(svg: &str, scale: f32) -> Result<Vec<u8>> {
    let opts = resvg::usvg::Options { fontdb: fontdb().clone(), ..Default::default() };
    let tree = resvg::usvg::Tree::from_str(svg, &opts).context("the SVG does not parse")?;
    let size = tree.size().to_int_size().scale_by(scale).ok_or_else(|| anyhow!("empty picture"))?;
    let mut pixmap = resvg::tiny_skia::Pixmap::new(size.width(), size.height())
        .ok_or_else(|| anyhow!("picture too large: {}x{}", size.width(), size.height()))?;
    pixmap.fill(resvg::tiny_skia::Color::WHITE);
    resvg::render(&tree, resvg::tiny_skia::Transform::from_scale(scale, scale), &mut pixmap.as_mut());
    pixmap.encode_png().map_err(|e| anyhow!("PNG encoding failed: {e}"))
}

/// Writes `stem.svg` and `stem.png` (twice the SVG's size) into `dir`; returns the SVG text.
pub fn write_svg_png(dir: &Path, stem: &str, svg: String) -> Result<String> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let svg_path = dir.join(format!("{stem}.svg"));
    std::fs::write(&svg_path, &svg).with_context(|| format!("writing {}", svg_path.display()))?;
    let png_path = dir.join(format!("{stem}.png"));
    std::fs::write(&png_path, svg_to_png(&svg, 2.0)?).with_context(|| format!("writing {}", png_path.display()))?;
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_lays_out_and_renders_to_png() {
        let svg = dot_to_svg("digraph { a -> b [label=\"sep_conv_3x3\"]; }").unwrap();
        assert!(svg.contains("<svg") && svg.contains("sep_conv_3x3"));
        let png = svg_to_png(&svg, 1.0).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        assert!(dot_to_svg("digraph { a -> ; }").is_err());
    }
}
