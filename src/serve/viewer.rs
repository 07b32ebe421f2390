//! The page at `GET /`: a self-contained viewer (no scripts, styles or fonts from elsewhere) that
//! streams an answer from this server's own chat endpoint and overlays each token's map on the
//! image.

use std::sync::OnceLock;

const TEMPLATE: &str = include_str!("viewer.html");
const TABLE_SLOT: &str = "__FASTRM_VIRIDIS__";

/// The page with the PNG overlays' colour table written into it, so the browser and
/// `fastrm explain --png` colour a map from one table.
pub fn page() -> &'static str {
    static PAGE: OnceLock<String> = OnceLock::new();
    PAGE.get_or_init(|| {
        let hex: String = crate::render::colormap_table()
            .iter()
            .map(|[r, g, b]| format!("{r:02x}{g:02x}{b:02x}"))
            .collect();
        TEMPLATE.replacen(TABLE_SLOT, &hex, 1)
    })
}

/// Lets the page run its own inline script and talk to this origin only: whatever the page is
/// given, the browser fetches nothing from anywhere else.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; \
     style-src 'unsafe-inline'; img-src data: blob:; connect-src 'self'; base-uri 'none'; \
     form-action 'none'";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_carries_the_overlay_table_and_nothing_external() {
        let p = page();
        assert!(!p.contains(TABLE_SLOT));
        let table = crate::render::colormap_table();
        let first = format!("{:02x}{:02x}{:02x}", table[0][0], table[0][1], table[0][2]);
        let start = p.find(&format!("\"{first}")).expect("table in the page") + 1;
        let hex = &p[start..start + 256 * 6];
        for (i, c) in table.iter().enumerate() {
            let want = format!("{:02x}{:02x}{:02x}", c[0], c[1], c[2]);
            assert_eq!(&hex[i * 6..i * 6 + 6], want, "entry {i}");
        }
        for external in ["http://", "https://", "//cdn", "src=\"http", "@import"] {
            assert!(!p.contains(external), "page refers to {external}");
        }
    }
}
