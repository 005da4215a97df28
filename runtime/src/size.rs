//! Sizes and offsets as users write them. One type each, with named fields, so that no caller has
//! to remember a tuple order: [`Size`] is `WxH` (width first, as on command lines and in UIs);
//! diffusers' `(height, width)` pairs come from [`Size::hw`].

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Field, Result};

/// An image size in pixels, written `WxH` (`1024x768` is 1024 wide).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Size {
    pub width: u32,
    pub height: u32,
}

impl Size {
    /// diffusers' `(height, width)` order (`original_size`, `target_size`).
    pub fn hw(self) -> (u32, u32) {
        (self.height, self.width)
    }
}

impl FromStr for Size {
    type Err = Error;

    /// `WxH` (or `WXH`), e.g. `1024x768`; spaces around the numbers are allowed.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::request(Field::Size, format!("size {s:?}: expected WIDTHxHEIGHT, e.g. 1024x768"));
        let (w, h) = s.split_once(['x', 'X']).ok_or_else(bad)?;
        let side = |v: &str| v.trim().parse::<u32>().map_err(|_| bad());
        Ok(Size { width: side(w)?, height: side(h)? })
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

/// A crop offset in pixels, written `TOP,LEFT` (diffusers' `crops_coords_top_left` order).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Offset {
    pub top: u32,
    pub left: u32,
}

impl Offset {
    /// diffusers' `(top, left)` pair.
    pub fn top_left(self) -> (u32, u32) {
        (self.top, self.left)
    }
}

impl FromStr for Offset {
    type Err = Error;

    /// `TOP,LEFT`, e.g. `0,0` or `256, 128`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::request(Field::SizeConditioning, format!("offset {s:?}: expected TOP,LEFT, e.g. 0,0"));
        let (top, left) = s.split_once(',').ok_or_else(bad)?;
        let value = |v: &str| v.trim().parse::<u32>().map_err(|_| bad());
        Ok(Offset { top: value(top)?, left: value(left)? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_width_first() {
        let size: Size = "1024x768".parse().unwrap();
        assert_eq!((size.width, size.height, size.hw()), (1024, 768, (768, 1024)));
        assert_eq!(" 64 X 32 ".parse::<Size>().unwrap(), Size { width: 64, height: 32 });
        assert_eq!(size.to_string(), "1024x768");
        for bad in ["", "x", "1024", "1024x", "-1x5", "1x99999999999", "1x2x3", "ax1"] {
            assert!(bad.parse::<Size>().is_err(), "{bad:?} was accepted");
        }
        let offset: Offset = "256, 128".parse().unwrap();
        assert_eq!(offset.top_left(), (256, 128));
        assert!("1;2".parse::<Offset>().is_err());
    }
}
