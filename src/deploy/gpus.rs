//! The NVIDIA GPU models Akash providers advertise, by the names their inventory operator reports
//! (which SDL `gpu.attributes.vendor.nvidia[].model` must match exactly, lowercase), with the memory
//! sizes listed for each. Transcribed from Akash's own table, `devices/pcie/gpus.json` in
//! github.com/akash-network/provider-configs (commit 03b3eefb1ed7ce6e6d4c88ffcce3476af54f740f): a
//! model outside it gets no bid from a provider running that table. A plan marks a newer model
//! `unlisted = true` to use it anyway.

/// (model, memory sizes listed for it).
pub const NVIDIA: &[(&str, &[&str])] = &[
    ("a100", &["40Gi", "64Gi", "80Gi"]),
    ("a40", &["48Gi"]),
    ("a800", &["80Gi"]),
    ("gt1030", &["2Gi"]),
    ("gtx1050", &["2Gi", "3Gi"]),
    ("gtx1050ti", &["4Gi"]),
    ("gtx1060", &["3Gi", "5Gi", "6Gi"]),
    ("gtx1070", &["8Gi"]),
    ("gtx1070ti", &["8Gi"]),
    ("gtx1080", &["8Gi"]),
    ("gtx1080ti", &["11Gi"]),
    ("gtx1650super", &["4Gi"]),
    ("gtx1650ti", &["4Gi"]),
    ("gtx1660", &["6Gi"]),
    ("gtx1660ti", &["6Gi"]),
    ("gtx960", &["2Gi", "4Gi"]),
    ("gtx970", &["4Gi"]),
    ("gtx980", &["4Gi"]),
    ("gtx980ti", &["6Gi"]),
    ("h100", &["80Gi"]),
    ("h200", &["141Gi"]),
    ("m4000", &["8Gi"]),
    ("mx150", &["2Gi"]),
    ("p100", &["16Gi"]),
    ("p2000", &["4Gi", "5Gi"]),
    ("p4", &["8Gi"]),
    ("p40", &["24Gi"]),
    ("p4000", &["8Gi"]),
    ("p5000", &["16Gi"]),
    ("p6000", &["24Gi"]),
    ("rtx2000eada", &["16Gi"]),
    ("rtx2060", &["6Gi"]),
    ("rtx2060super", &["8Gi"]),
    ("rtx2070", &["8Gi"]),
    ("rtx2070super", &["8Gi"]),
    ("rtx2080", &["8Gi"]),
    ("rtx2080super", &["8Gi"]),
    ("rtx2080ti", &["11Gi"]),
    ("rtx3060", &["12Gi"]),
    ("rtx3060ti", &["8Gi"]),
    ("rtx3070", &["8Gi"]),
    ("rtx3080", &["10Gi"]),
    ("rtx3090", &["24Gi"]),
    ("rtx3090ti", &["24Gi"]),
    ("rtx4000", &["8Gi"]),
    ("rtx4000ada", &["20Gi"]),
    ("rtx4000sffada", &["20Gi"]),
    ("rtx4060", &["8Gi"]),
    ("rtx4060ti", &["16Gi"]),
    ("rtx4070", &["12Gi"]),
    ("rtx4070ti", &["12Gi"]),
    ("rtx4080", &["16Gi"]),
    ("rtx4090", &["24Gi"]),
    ("rtx5000", &["16Gi"]),
    ("rtx8000", &["48Gi"]),
    ("rtxa2000", &["6Gi"]),
    ("rtxa6000", &["48Gi"]),
    ("t4", &["16Gi"]),
    ("v100", &["16Gi", "32Gi"]),
];

/// Checks a plan's GPU choice against the table: the model by exact (lowercase) name, with a
/// "did you mean" for near misses; the memory size, when given, against the sizes listed for it.
pub fn check(model: &str, ram: Option<&str>) -> Result<(), String> {
    let lower = model.trim().to_ascii_lowercase();
    let Some((_, sizes)) = NVIDIA.iter().find(|(m, _)| *m == lower) else {
        let hint = suggest(&lower).map(|m| format!(" Did you mean `{m}`?")).unwrap_or_default();
        return Err(format!(
            "`{model}` is not a GPU model Akash providers advertise (Akash's provider-configs gpus.json).{hint} \
             If providers list it now, add `unlisted = true` to this choice"
        ));
    };
    if let Some(ram) = ram {
        let canonical = super::sdl::canonical_size(ram)?;
        if !sizes.contains(&canonical.as_str()) {
            return Err(format!("{lower} is listed with {} of memory, not {canonical}", sizes.join(" or ")));
        }
    }
    Ok(())
}

/// The listed model a misspelling most likely meant: one whose name the input contains once
/// spaces, dashes and a vendor prefix are dropped ("NVIDIA A100" → a100, "rtx-4090" → rtx4090), or
/// else the closest within two edits.
fn suggest(input: &str) -> Option<&'static str> {
    let squashed: String = input.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
    let squashed = squashed.strip_prefix("nvidia").unwrap_or(&squashed);
    if let Some((m, _)) = NVIDIA.iter().find(|(m, _)| *m == squashed) {
        return Some(m);
    }
    NVIDIA.iter().map(|(m, _)| (strsim::levenshtein(m, squashed), *m)).filter(|(d, _)| *d <= 2).min().map(|(_, m)| m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_models_pass_and_near_misses_get_a_suggestion() {
        check("h100", Some("80Gi")).unwrap();
        check("A100", Some("40gi")).unwrap();
        check("rtx4090", None).unwrap();
        let e = check("nvidia a100", None).unwrap_err();
        assert!(e.contains("Did you mean `a100`"), "{e}");
        assert!(check("RTX 4090", None).unwrap_err().contains("`rtx4090`"));
        assert!(check("h1000", None).unwrap_err().contains("`h100`"));
        let e = check("quantum9000", None).unwrap_err();
        assert!(!e.contains("Did you mean") && e.contains("unlisted = true"), "{e}");
        let e = check("h100", Some("40Gi")).unwrap_err();
        assert!(e.contains("80Gi") && e.contains("40Gi"), "{e}");
    }
}
