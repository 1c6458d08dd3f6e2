//! Licence names as metadata tables spell them (`by`, `cc-by-4.0`, `CC BY-SA 3.0`, the
//! creativecommons.org URLs, `public domain`) normalised to one family + version, and the
//! allowlist `curate` filters on.

use std::fmt;

/// A normalised licence: a family (`cc0`, `pdm`, `cc-by`, `cc-by-sa`, `cc-by-nc`, `apache`, ...)
/// and an optional version.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Licence {
    pub family: String,
    pub version: Option<String>,
}

impl fmt::Display for Licence {
    /// SPDX-style identifier: `CC-BY-SA-4.0`, `CC0-1.0`, `Apache-2.0`, `PDM`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let family = match self.family.as_str() {
            "apache" => "Apache".to_string(),
            "pdm" => "PDM".to_string(),
            "mit" => "MIT".to_string(),
            other => other.to_uppercase(),
        };
        match &self.version {
            Some(v) if self.family != "pdm" => write!(f, "{family}-{v}"),
            _ => write!(f, "{family}"),
        }
    }
}

impl Licence {
    /// Whether the licence requires crediting the author (everything but CC0 and the PD mark).
    pub fn requires_attribution(&self) -> bool {
        !matches!(self.family.as_str(), "cc0" | "pdm")
    }

    /// Parses one spelling of a licence; `None` when it is not recognised.
    pub fn parse(raw: &str) -> Option<Licence> {
        let s = raw.trim().to_ascii_lowercase();
        if s.is_empty() {
            return None;
        }
        let s = s.trim_start_matches("https://").trim_start_matches("http://").trim_start_matches("www.");
        if let Some(rest) = s.strip_prefix("creativecommons.org/") {
            return parse_cc_url(rest);
        }
        let tokens: Vec<&str> = s
            .split(|c: char| c.is_whitespace() || matches!(c, '-' | '_' | '/' | ',' | '(' | ')'))
            .filter(|t| !t.is_empty())
            .collect();
        let is_version = |t: &str| {
            t.chars().next().is_some_and(|c| c.is_ascii_digit()) && t.chars().all(|c| c.is_ascii_digit() || c == '.')
        };
        let version = tokens.iter().copied().find(|t| is_version(t) && *t != "0").map(normalise_version);
        let words: Vec<&str> = tokens
            .iter()
            .copied()
            .filter(|t| !is_version(t) || *t == "0")
            .filter(|t| {
                !matches!(
                    *t,
                    "creative"
                        | "commons"
                        | "license"
                        | "licence"
                        | "international"
                        | "generic"
                        | "unported"
                        | "universal"
                        | "v"
                        | "alike"
                )
            })
            .map(|t| match t {
                "attribution" => "by",
                "sharealike" | "share" => "sa",
                "noncommercial" => "nc",
                "noderivatives" | "noderivs" => "nd",
                t => t,
            })
            .collect();
        let family = match words.as_slice() {
            ["cc0"] | ["cc", "0"] | ["cc", "zero"] | ["zero"] | ["cc0", "public", "domain", ..] => "cc0".to_string(),
            ["public", "domain", ..] | ["publicdomain", ..] | ["pd"] | ["pdm"] => {
                return Some(Licence { family: "pdm".into(), version: None })
            }
            ["apache", ..] => "apache".to_string(),
            ["mit"] => "mit".to_string(),
            rest => {
                let rest = match rest.first() {
                    Some(&"cc") => &rest[1..],
                    _ => rest,
                };
                if rest.first() != Some(&"by") || rest.iter().any(|t| !matches!(*t, "by" | "sa" | "nc" | "nd")) {
                    return None;
                }
                format!("cc-{}", rest.join("-"))
            }
        };
        let version = match family.as_str() {
            "cc0" => Some("1.0".to_string()),
            _ => version,
        };
        Some(Licence { family, version })
    }
}

fn normalise_version(v: &str) -> String {
    if v.contains('.') {
        v.to_string()
    } else {
        format!("{v}.0")
    }
}

/// `licenses/by-sa/4.0/`, `publicdomain/zero/1.0/`, `publicdomain/mark/1.0/`.
fn parse_cc_url(path: &str) -> Option<Licence> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    match parts.as_slice() {
        ["licenses", code, rest @ ..] => {
            let code_ok = code.split('-').all(|t| matches!(t, "by" | "sa" | "nc" | "nd")) && code.starts_with("by");
            code_ok
                .then(|| Licence { family: format!("cc-{code}"), version: rest.first().map(|v| normalise_version(v)) })
        }
        ["publicdomain", "zero", ..] => Some(Licence { family: "cc0".into(), version: Some("1.0".into()) }),
        ["publicdomain", "mark", ..] => Some(Licence { family: "pdm".into(), version: None }),
        _ => None,
    }
}

/// Licence families a dataset may contain. Any version of an allowed family passes.
#[derive(Debug, Clone, PartialEq)]
pub struct Allowlist {
    families: Vec<String>,
}

impl Default for Allowlist {
    /// CC0, the Public Domain Mark, CC-BY and CC-BY-SA: free to train on and redistribute with credit.
    fn default() -> Allowlist {
        Allowlist { families: ["cc0", "pdm", "cc-by", "cc-by-sa"].map(String::from).to_vec() }
    }
}

impl Allowlist {
    /// From a comma-separated list of licence spellings (`cc0,pdm,cc-by,cc-by-sa,apache-2.0`).
    pub fn parse(list: &str) -> Result<Allowlist, String> {
        let families = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| Licence::parse(s).map(|l| l.family).ok_or_else(|| format!("unknown licence `{s}` in allowlist")))
            .collect::<Result<Vec<_>, _>>()?;
        if families.is_empty() {
            return Err("the licence allowlist is empty".into());
        }
        Ok(Allowlist { families })
    }

    pub fn allows(&self, l: &Licence) -> bool {
        self.families.contains(&l.family)
    }

    pub fn families(&self) -> &[String] {
        &self.families
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> String {
        Licence::parse(s).map(|l| l.to_string()).unwrap_or_else(|| "?".into())
    }

    #[test]
    fn spellings_normalise() {
        for (raw, want) in [
            ("by", "CC-BY"),
            ("cc-by-4.0", "CC-BY-4.0"),
            ("CC BY-SA 3.0", "CC-BY-SA-3.0"),
            ("by-sa", "CC-BY-SA"),
            ("https://creativecommons.org/licenses/by/2.0/", "CC-BY-2.0"),
            ("http://creativecommons.org/licenses/by-nc-sa/4.0/deed.en", "CC-BY-NC-SA-4.0"),
            ("https://creativecommons.org/publicdomain/zero/1.0/", "CC0-1.0"),
            ("https://creativecommons.org/publicdomain/mark/1.0/", "PDM"),
            ("public domain", "PDM"),
            ("Public Domain Mark 1.0", "PDM"),
            ("cc0", "CC0-1.0"),
            ("CC0 1.0 Universal", "CC0-1.0"),
            ("Creative Commons Attribution 4.0", "CC-BY-4.0"),
            ("Attribution-ShareAlike 3.0 Unported", "CC-BY-SA-3.0"),
            ("apache-2.0", "Apache-2.0"),
            ("Apache License 2.0", "Apache-2.0"),
            ("all rights reserved", "?"),
            ("", "?"),
        ] {
            assert_eq!(id(raw), want, "{raw}");
        }
    }

    #[test]
    fn default_allowlist() {
        let a = Allowlist::default();
        for ok in ["cc0", "public domain", "cc-by-2.5", "CC BY-SA 4.0"] {
            assert!(a.allows(&Licence::parse(ok).unwrap()), "{ok}");
        }
        for no in ["cc-by-nc-4.0", "by-nd", "apache-2.0"] {
            assert!(!a.allows(&Licence::parse(no).unwrap()), "{no}");
        }
        let b = Allowlist::parse("cc0,pdm,cc-by,cc-by-sa,apache-2.0").unwrap();
        assert!(b.allows(&Licence::parse("Apache-2.0").unwrap()));
        assert!(Allowlist::parse("cc0,bogus").unwrap_err().contains("bogus"));
        assert!(!Licence::parse("cc-by").unwrap().to_string().is_empty());
        assert!(!Licence::parse("cc0").unwrap().requires_attribution());
        assert!(Licence::parse("by-sa").unwrap().requires_attribution());
    }
}
