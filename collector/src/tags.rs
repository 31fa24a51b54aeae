//! Tags: the named groups of a source's `path_tags` regex, matched against a file's path
//! ([`PathTagger`]), and the writer tags `writer_cgroup` / `container_id` ([`Writer`]).
//!
//! The collector can't ask a pod who it is; the pod's directory name, set through
//! `subPathExpr`, says it (`<namespace>_<pod>_<podIP>_<nodeIP>_<node>`). Path tags are computed
//! once per file, when it is first tracked, never per line. Writer tags come from the eBPF probe
//! (`probe_writer_tags`): the cgroup of the process on this node that last wrote the file, which
//! no path regex can recover; they change only when that writer changes.
//!
//! This module does no IO: resolving a cgroup id to its path is `cgroup`'s job.

use regex::Regex;

/// Name of the tag holding the writer's cgroup path.
pub const WRITER_CGROUP: &str = "writer_cgroup";
/// Name of the tag holding the container id found in the writer's cgroup path.
pub const CONTAINER_ID: &str = "container_id";

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

/// The process that wrote a file, as the probe last saw it: its cgroup v2 path (as
/// `/proc/<pid>/cgroup` shows it, e.g. `/kubepods.slice/.../cri-containerd-<id>.scope`) and the
/// container id in that path, when there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Writer {
    /// The cgroup path, relative to the cgroup2 mount, with a leading `/`.
    pub cgroup: String,
    /// The 64-hex container id of a container runtime's scope in `cgroup`.
    pub container_id: Option<String>,
}

impl Writer {
    /// The writer in cgroup `cgroup`, with the container id found in it.
    pub fn new(cgroup: String) -> Writer {
        let container_id = container_id(&cgroup).map(str::to_string);
        Writer {
            cgroup,
            container_id,
        }
    }
}

/// Runtimes' prefixes of a container's cgroup directory (`<prefix>-<id>.scope` under systemd;
/// the bare id under the cgroupfs driver).
const RUNTIME_PREFIXES: [&str; 4] = ["docker", "cri-containerd", "crio", "libpod"];

/// The container id in a cgroup path: the last component that is a 64-hex id, bare (cgroupfs
/// driver: `/kubepods/burstable/pod<uid>/<id>`) or as a runtime's systemd scope
/// (`docker-<id>.scope`, `cri-containerd-<id>.scope`, `crio-<id>.scope`, `libpod-<id>.scope`).
/// `crio-conmon-<id>.scope` is CRI-O's monitor process, not the container, and does not count.
pub fn container_id(cgroup: &str) -> Option<&str> {
    cgroup.rsplit('/').find_map(|part| {
        let part = part.strip_suffix(".scope").unwrap_or(part);
        let id = match part.rsplit_once('-') {
            Some((prefix, id)) if RUNTIME_PREFIXES.contains(&prefix) => id,
            Some(_) => return None,
            None => part,
        };
        (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
    })
}

/// A file's tags: its path tags, then the writer's (`writer_cgroup`, `container_id`). A writer
/// tag replaces a path tag of the same name: it was observed, the path only names it.
pub fn with_writer(
    path_tags: Vec<(String, String)>,
    writer: Option<&Writer>,
) -> Vec<(String, String)> {
    let Some(w) = writer else {
        return path_tags;
    };
    let mut writer_tags = vec![(WRITER_CGROUP.to_string(), w.cgroup.clone())];
    if let Some(id) = &w.container_id {
        writer_tags.push((CONTAINER_ID.to_string(), id.clone()));
    }
    let mut tags: Vec<(String, String)> = path_tags
        .into_iter()
        .filter(|(k, _)| !writer_tags.iter().any(|(w, _)| w == k))
        .collect();
    tags.extend(writer_tags);
    tags
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn container_ids_of_each_runtime_and_driver() {
        let cases = [
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice/cri-containerd-{ID}.scope"),
            format!("/system.slice/docker-{ID}.scope"),
            format!("/kubepods.slice/kubepods-pod9.slice/crio-{ID}.scope"),
            format!("/machine.slice/libpod-{ID}.scope/container"),
            format!("/kubepods/burstable/pod1234-5678/{ID}"),
            format!("/docker/{ID}"),
        ];
        for c in &cases {
            assert_eq!(container_id(c), Some(ID), "{c}");
        }
    }

    #[test]
    fn no_container_id_in_plain_or_monitor_cgroups() {
        for c in [
            "/",
            "/user.slice/user-1000.slice/session-3.scope",
            "/system.slice/nginx.service",
            &format!("/kubepods.slice/crio-conmon-{ID}.scope"),
            &format!("/system.slice/docker-{}.scope", &ID[..63]),
            &format!("/system.slice/docker-{}g.scope", &ID[..63]),
        ] {
            assert_eq!(container_id(c), None, "{c}");
        }
    }

    #[test]
    fn writer_tags_follow_path_tags_and_replace_same_named_ones() {
        let path = vec![
            ("app".to_string(), "nginx".to_string()),
            ("container_id".to_string(), "from-path".to_string()),
        ];
        let w = Writer::new(format!("/system.slice/docker-{ID}.scope"));
        let tags = with_writer(path.clone(), Some(&w));
        let want: Vec<(String, String)> = [
            ("app", "nginx"),
            ("writer_cgroup", w.cgroup.as_str()),
            ("container_id", ID),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(tags, want);
        assert_eq!(with_writer(path.clone(), None), path);
        let plain = Writer::new("/test.slice".to_string());
        assert_eq!(plain.container_id, None);
        assert_eq!(
            with_writer(vec![], Some(&plain)),
            vec![("writer_cgroup".to_string(), "/test.slice".to_string())]
        );
    }

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
