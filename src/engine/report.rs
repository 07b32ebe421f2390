//! `explain --out DIR`: one heatmap overlay PNG per token, a contact sheet, and `explain.json`.
//!
//! Everything is rendered into a hidden staging folder inside DIR first and moved into place only
//! when all of it exists, `explain.json` last, so a run that fails or is interrupted never leaves a
//! set of files that looks complete: either DIR holds a finished run's `explain.json` and its PNGs,
//! or it holds no new `explain.json`. The staging folder is removed on every exit path that Rust
//! controls (an error, a panic); a killed process can leave it behind, under a name that says so.

use std::path::{Path, PathBuf};

use crate::engine::Explained;
use crate::error::{Error, Result};
use crate::render::{contact_sheet, heatmap_overlay, token_caption, write_png, OverlayOptions};
use crate::vision::RgbImage;

pub const JSON_FILE: &str = "explain.json";
pub const SHEET_FILE: &str = "sheet.png";

/// The overlay of token `index`'s map on image `image` (from 0) of `images`: `token_NNN.png` for
/// a prompt of one image, `token_NNN_imageK.png` (K from 1) for several.
pub fn token_file(index: usize, image: usize, images: usize) -> String {
    if images > 1 {
        format!("token_{index:03}_image{}.png", image + 1)
    } else {
        format!("token_{index:03}.png")
    }
}

pub struct Staging {
    out: PathBuf,
    tmp: PathBuf,
    /// The output folder did not exist before: a run that fails removes it again (when empty).
    created: bool,
    committed: bool,
}

impl Staging {
    /// Creates DIR (and parents) and the staging folder in it, proving DIR is writable before any
    /// expensive work starts.
    pub fn new(out: &Path) -> Result<Self> {
        let created = !out.exists();
        std::fs::create_dir_all(out).map_err(|e| Error::Io {
            path: out.to_path_buf(),
            source: std::io::Error::new(e.kind(), format!("cannot create the output folder: {e}")),
        })?;
        let tmp = out.join(format!(".fastrm-partial-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        std::fs::create_dir(&tmp).map_err(|e| Error::Io {
            path: out.to_path_buf(),
            source: std::io::Error::new(e.kind(), format!("output folder is not writable: {e}")),
        })?;
        Ok(Staging {
            out: out.to_path_buf(),
            tmp,
            created,
            committed: false,
        })
    }

    /// Holds the output folder's lock while a run's files replace another's: concurrent runs into
    /// one folder take turns, so none mixes its files with another's.
    /// (An advisory lock on the folder itself, so no lock file is left in it.)
    fn lock(&self) -> Result<std::fs::File> {
        let f = std::fs::File::open(&self.out).map_err(|e| Error::io(&self.out, e))?;
        f.lock().map_err(|e| Error::io(&self.out, e))?;
        Ok(f)
    }

    /// Renders every token's overlay on each of `views` (the prompt's images as the model saw
    /// them, in order: one overlay per token per image), the contact sheet and the JSON document,
    /// then moves them into the output folder, replacing a previous run's files. Returns the
    /// final paths.
    pub fn write(
        mut self,
        views: &[RgbImage],
        ex: &Explained,
        doc: &impl serde::Serialize,
    ) -> Result<Vec<PathBuf>> {
        let mut names = Vec::with_capacity(ex.tokens.len() * views.len() + 2);
        let mut tiles = Vec::with_capacity(ex.tokens.len() * views.len());
        for t in &ex.tokens {
            if t.images != views.len() {
                return Err(Error::input(format!(
                    "token {}'s map covers {} images; {} were given to draw on",
                    t.index,
                    t.images,
                    views.len()
                )));
            }
            for (k, (view, map)) in views.iter().zip(t.per_image()).enumerate() {
                let mut caption = token_caption(t.index, &t.text, Some(t.entropy));
                if views.len() > 1 {
                    caption = format!("{caption} (image {})", k + 1);
                }
                let opts = OverlayOptions {
                    caption,
                    ..Default::default()
                };
                let layout = ex.generation.layouts.get(k).ok_or_else(|| {
                    Error::input(format!(
                        "token {}'s map has no layout for image {k}",
                        t.index
                    ))
                })?;
                let (grid, placed) = layout.place(map)?;
                let img = heatmap_overlay(view, &placed, grid, &opts)?;
                let name = token_file(t.index, k, views.len());
                write_png(&self.tmp.join(&name), &img)?;
                names.push(name);
                tiles.push(img);
            }
        }
        let columns = (tiles.len() as f64).sqrt().ceil() as usize;
        let title = format!("{}: {}", ex.method.name(), ex.generation.text.trim());
        write_png(
            &self.tmp.join(SHEET_FILE),
            &contact_sheet(&tiles, columns, &title)?,
        )?;
        names.push(SHEET_FILE.to_string());
        let json = crate::util::json_text(doc, true)?;
        std::fs::write(self.tmp.join(JSON_FILE), json)
            .map_err(|e| Error::io(self.tmp.join(JSON_FILE), e))?;
        names.push(JSON_FILE.to_string());

        // A previous run's files must not mix with this one's: its explain.json goes first (so the
        // folder never claims completeness for a mixed set), then its token PNGs.
        let _lock = self.lock()?;
        self.committed = true;
        let old_json = self.out.join(JSON_FILE);
        if old_json.exists() {
            std::fs::remove_file(&old_json).map_err(|e| Error::io(&old_json, e))?;
        }
        for entry in std::fs::read_dir(&self.out).map_err(|e| Error::io(&self.out, e))? {
            let entry = entry.map_err(|e| Error::io(&self.out, e))?;
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with("token_") && name.ends_with(".png") {
                std::fs::remove_file(entry.path()).map_err(|e| Error::io(entry.path(), e))?;
            }
        }
        let mut paths = Vec::with_capacity(names.len());
        for name in &names {
            let dst = self.out.join(name);
            std::fs::rename(self.tmp.join(name), &dst).map_err(|e| Error::io(&dst, e))?;
            paths.push(dst);
        }
        Ok(paths)
    }
}

impl Staging {
    /// Where a file named `name` is staged.
    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.join(name)
    }

    /// Moves the staged files `names` into the output folder in order, replacing files of the same
    /// names; the last one (the run's JSON, by convention) is deleted from the output folder first
    /// and moved in last, so the folder never pairs a new JSON with old files or the reverse.
    /// Returns the final paths.
    pub fn commit(mut self, names: &[&str]) -> Result<Vec<PathBuf>> {
        for n in names {
            if !self.tmp.join(n).is_file() {
                return Err(Error::input(format!("{n} was not staged")));
            }
        }
        let _lock = self.lock()?;
        self.committed = true;
        if let Some(last) = names.last() {
            let old = self.out.join(last);
            if old.exists() {
                std::fs::remove_file(&old).map_err(|e| Error::io(&old, e))?;
            }
        }
        let mut paths = Vec::with_capacity(names.len());
        for n in names {
            let dst = self.out.join(n);
            std::fs::rename(self.tmp.join(n), &dst).map_err(|e| Error::io(&dst, e))?;
            paths.push(dst);
        }
        Ok(paths)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.tmp);
        if self.created && !self.committed {
            // Only an empty folder goes: another run may have written into it meanwhile.
            let _ = std::fs::remove_dir(&self.out);
        }
    }
}
