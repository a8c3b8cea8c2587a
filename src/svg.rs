//! Writing SVG pictures (`analyze --plot`, `eval --plot`): text made safe
//! for an SVG document.

/// `s` escaped for SVG text and attributes. Control characters, which
/// XML 1.0 allows in no form (not even as `&#7;`), are shown as `\u{7}`,
/// so a directory name holding one still gives a picture every reader
/// parses.
pub(crate) fn xml(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if c.is_control() || c == '\u{fffe}' || c == '\u{ffff}' => {
                out.push_str(&format!("\\u{{{:x}}}", c as u32))
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_text_escapes_markup_and_shows_control_characters() {
        assert_eq!(xml("a<b>&\"c'"), "a&lt;b&gt;&amp;&quot;c&apos;");
        assert_eq!(xml("dir\u{7}\u{1b}[31m\nx\u{0}"), "dir\\u{7}\\u{1b}[31m\\u{a}x\\u{0}");
        assert_eq!(xml("日本語"), "日本語");
    }
}
