//! Embeds the web console's files into the binary: the console's own (`web/static/`) and noVNC's ES modules
//! (`web/node_modules/@novnc/novnc/{core,vendor}`, installed from the npm registry by `npm ci` in `web/`;
//! this script runs it when they are missing). Nothing is fetched when `isr ui` runs.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).flatten().collect();
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let p = e.path();
        if p.is_dir() {
            files(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn mime(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    }
}

fn main() {
    let web = Path::new(env!("CARGO_MANIFEST_DIR")).join("web");
    let novnc = web.join("node_modules/@novnc/novnc");
    println!("cargo:rerun-if-changed=web/static");
    println!("cargo:rerun-if-changed=web/package-lock.json");
    if !novnc.join("core/rfb.js").exists() {
        let status = std::process::Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--omit=dev"])
            .current_dir(&web)
            .status();
        match status {
            Ok(s) if s.success() => {}
            other => panic!(
                "noVNC is missing from {} and `npm ci` failed ({other:?}): install Node.js/npm (make deps does)",
                novnc.display()
            ),
        }
    }
    let mut code = String::from("/// Every embedded file: URL path, MIME type, bytes.\npub static ASSETS: &[(&str, &str, &[u8])] = &[\n");
    let mut add = |url_prefix: &str, root: &Path| {
        let mut list = Vec::new();
        files(root, &mut list);
        for f in list {
            let rel = f.strip_prefix(root).expect("below root").to_string_lossy().replace('\\', "/");
            if !rel.ends_with(".js")
                && !rel.ends_with(".html")
                && !rel.ends_with(".css")
                && !rel.ends_with(".svg")
                && !rel.ends_with(".png")
            {
                continue;
            }
            writeln!(
                code,
                "    ({:?}, {:?}, include_bytes!({:?})),",
                format!("{url_prefix}{rel}"),
                mime(&f),
                f.display().to_string()
            )
            .expect("write");
        }
    };
    add("/", &web.join("static"));
    add("/novnc/core/", &novnc.join("core"));
    add("/novnc/vendor/", &novnc.join("vendor"));
    code.push_str("];\n");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("assets.rs");
    std::fs::write(out, code).expect("writing assets.rs");
}
