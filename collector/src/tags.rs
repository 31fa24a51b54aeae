//! Path tags: the named groups of a source's `path_tags` regex, matched against a file's path.
//!
//! The collector can't ask a pod who it is; the pod's directory name, set through
//! `subPathExpr`, says it (`<namespace>_<pod>_<podIP>_<nodeIP>_<node>`). Tags are computed
//! once per file, when it is first tracked, never per line.

use regex::Regex;

/// Extracts tags from paths.
#[derive(Debug, Clone)]
pub struct PathTagger {
    re: Option<Regex>,
}

impl PathTagger {
    /// A tagger for `pattern` (validated by config); `None` tags nothing.
    pub fn new(pattern: Option<&str>) -> Result<PathTagger, regex::Error> {
        Ok(PathTagger {
            re: pattern.map(Regex::new).transpose()?,
        })
    }

    /// The named groups that matched, in pattern order; `None` when the pattern does not
    /// match the path at all (the file is still collected, untagged).
    pub fn tags(&self, path: &str) -> Option<Vec<(String, String)>> {
        let Some(re) = &self.re else {
            return Some(Vec::new());
        };
        let caps = re.captures(path)?;
        Some(
            re.capture_names()
                .flatten()
                .filter_map(|n| {
                    caps.name(n)
                        .map(|m| (n.to_string(), m.as_str().to_string()))
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_directory_becomes_tags() {
        let t = PathTagger::new(Some(
            r"^/var/log/(?P<app>[^/]+)/(?P<namespace>[^_]+)_(?P<pod>[^_]+)_(?P<pod_ip>[^_]+)_(?P<node_ip>[^_]+)_(?P<node>[^/]+)/",
        ))
        .expect("re");
        let tags = t
            .tags("/var/log/nginx/default_mock-nginx-7d9f_10.1.2.3_192.168.0.5_node-a/access.log")
            .expect("match");
        let want: Vec<(String, String)> = [
            ("app", "nginx"),
            ("namespace", "default"),
            ("pod", "mock-nginx-7d9f"),
            ("pod_ip", "10.1.2.3"),
            ("node_ip", "192.168.0.5"),
            ("node", "node-a"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(tags, want);
        assert_eq!(t.tags("/var/log/other.log"), None);
        assert_eq!(
            PathTagger::new(None).expect("none").tags("/x"),
            Some(vec![])
        );
    }
}
