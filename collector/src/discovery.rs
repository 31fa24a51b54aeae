//! Discovery: which files the globs name now, and opening them safely.
//!
//! Each include glob is split into path components and walked from its literal base. Literal
//! components are looked up directly (`lstat`), never listed, so `/logs/*/access.log` costs
//! one directory listing plus one `lstat` per pod directory; on NFS each call is a round trip.
//! Listings are cached by directory mtime and reused until the directory changes. A listing
//! whose mtime was younger than [`RACY`] when it was read is read again at the next pass: a
//! second change within a coarse timestamp's granule leaves the mtime as it was. (Younger by
//! the wall clock, or seen for less than [`RACY`]: a file server whose clock runs ahead would
//! otherwise keep its directories re-listed at every pass.) Every
//! directory is re-listed regardless now and then, for filesystems that do not update
//! directory mtimes: `FULL_RESCAN_EVERY` passes after the start, then at twice the spacing
//! each time such a re-list finds nothing the mtimes had not shown, up to `FULL_RESCAN_MAX`;
//! once one finds a change the mtime hid (or the tailer does, see
//! [`Discovery::distrust_mtimes`]), the spacing stays `FULL_RESCAN_EVERY` for good. `**`
//! crosses any number of directories.
//!
//! Security: the collector runs privileged and each pod controls its own directory. A symlink
//! met anywhere in the walk is resolved and followed only if its target lies inside the include
//! roots (the canonical literal bases); otherwise it is refused, warned about once and counted.
//! [`Discovery::open`] opens with `O_NOFOLLOW` and then checks, through `/proc/self/fd`, where
//! the descriptor really points, so a swap to a symlink between the walk and the open is caught.
//!
//! With `shard = "i/n"`, only files whose directory hashes to `i` are returned.
//!
//! This module does not decide what a file *is* (identity) or how far it was read.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs::File;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use globset::{GlobBuilder, GlobMatcher, GlobSet, GlobSetBuilder};

use crate::config::{Shard, SourceConfig};
use crate::metrics::Events;

/// Passes between full re-lists at first, and for good once directory mtimes were caught hiding
/// a change.
const FULL_RESCAN_EVERY: u64 = 12;
/// The widest spacing of full re-lists, in passes, while directory mtimes have shown every
/// change (8 minutes at the default `discover_interval` of 5 s).
const FULL_RESCAN_MAX: u64 = 96;
/// Listings whose directory mtime was younger than this when read are read again at the next
/// pass (the tailer's directory stamps use the same window).
pub(crate) const RACY: Duration = Duration::from_secs(10);
const MAX_DEPTH: usize = 48;

/// Whether a directory stamp whose newest time is `newest_ns` is old enough to trust: `racy`
/// old by the wall clock (`wall_ns`), or seen unchanged for `racy` (`seen_for`, our clock, for
/// a file server whose clock runs ahead). Either way the timestamp granule it was set in is
/// over, so any later change of the directory changes the stamp. Discovery's listings and the
/// tailer's directory stamps both follow this rule.
pub(crate) fn old_enough(newest_ns: i64, wall_ns: i64, seen_for: Duration, racy: Duration) -> bool {
    let racy_ns = i64::try_from(racy.as_nanos()).unwrap_or(i64::MAX);
    wall_ns.saturating_sub(newest_ns) >= racy_ns || seen_for >= racy
}

/// The wall clock in nanoseconds since the epoch (0 before it).
pub(crate) fn wall_ns() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// Errors building discovery or opening a file.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// A glob did not compile (config validation prevents this).
    #[error("source {source_name}: bad glob {glob:?}: {message}")]
    Glob {
        /// Source name.
        source_name: String,
        /// The glob.
        glob: String,
        /// Why.
        message: String,
    },
    /// The file could not be opened.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The descriptor points outside the include roots, or at something that is not a file.
    #[error("refusing {path}: {why}")]
    Refused {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

/// A file a glob names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Candidate {
    /// The path as the glob names it (what tags and events show).
    pub path: PathBuf,
    /// Where to open it: `path`, or a symlink's target inside the roots.
    pub open_path: PathBuf,
    /// Index of the source.
    pub source: usize,
}

#[derive(Debug)]
enum Comp {
    Literal(OsString),
    Glob(GlobMatcher),
    AnyDepth,
}

#[derive(Debug)]
struct Pattern {
    base: PathBuf,
    comps: Vec<Comp>,
}

#[derive(Debug)]
struct SourcePatterns {
    include: Vec<Pattern>,
    exclude: GlobSet,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    File,
    Dir,
    Symlink,
    Other,
}

/// Where the walk stands: `path` at component `ci` of include pattern `pi` of source `si`.
#[derive(Debug)]
struct Step {
    si: usize,
    pi: usize,
    path: PathBuf,
    ci: usize,
    depth: usize,
    at: At,
}

impl Step {
    fn walk(si: usize, pi: usize, path: PathBuf, ci: usize, depth: usize) -> Step {
        Step {
            si,
            pi,
            path,
            ci,
            depth,
            at: At::Dir,
        }
    }
}

/// What `Step::path` is to the walk.
#[derive(Debug, Clone, Copy)]
enum At {
    /// A directory whose entries are matched against component `ci`.
    Dir,
    /// A path component `ci` named (its kind known from a listing, or not yet): the file to
    /// admit when `ci` is the last component, else a directory to walk at `ci + 1`.
    Entry(Option<Kind>),
    /// An entry of a directory walked by `**` at `ci`: walked at `ci` too if a directory.
    Into(Kind),
}

/// A directory listing as [`fetch_listing`] found it.
#[derive(Debug)]
enum Listing {
    /// The directory is gone, or cannot be listed.
    Gone,
    /// Its mtime is the cached listing's: the cache holds.
    Unchanged,
    /// Listed at this mtime.
    Read(i64, Vec<(OsString, Kind)>),
}

/// A directory's mtime in nanoseconds, as listings hold it.
fn mtime_ns(md: &std::fs::Metadata) -> i64 {
    md.mtime() * 1_000_000_000 + md.mtime_nsec()
}

/// Lists `dir` unless its mtime is `cached` (the mtime of the listing held), entries sorted.
fn fetch_listing(dir: &Path, cached: Option<i64>) -> Listing {
    let Ok(md) = std::fs::metadata(dir) else {
        return Listing::Gone;
    };
    let mtime = mtime_ns(&md);
    if cached == Some(mtime) {
        return Listing::Unchanged;
    }
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Listing::Gone;
    };
    let mut items = Vec::new();
    for e in rd.flatten() {
        let kind = match e.file_type() {
            Ok(t) if t.is_symlink() => Kind::Symlink,
            Ok(t) if t.is_dir() => Kind::Dir,
            Ok(t) if t.is_file() => Kind::File,
            _ => Kind::Other,
        };
        items.push((e.file_name(), kind));
    }
    items.sort();
    Listing::Read(mtime, items)
}

/// The kind of the entry at `p` without following a symlink; `None` when there is none.
fn lstat_kind(p: &Path) -> Option<Kind> {
    let m = std::fs::symlink_metadata(p).ok()?;
    Some(if m.file_type().is_symlink() {
        Kind::Symlink
    } else if m.is_dir() {
        Kind::Dir
    } else if m.is_file() {
        Kind::File
    } else {
        Kind::Other
    })
}

/// A directory's listing held between passes.
#[derive(Debug)]
struct Held {
    /// The directory's mtime when listed.
    mtime: i64,
    /// Its entries, sorted.
    items: Vec<(OsString, Kind)>,
    /// When this pass first saw the directory at `mtime`.
    seen: Instant,
    /// The listing was read when `mtime` was older than [`RACY`] by the wall clock, or at least
    /// [`RACY`] after this process first saw it (a file server's clock running ahead of ours
    /// must not keep a directory re-listed at every pass): while the directory shows that
    /// mtime, the listing holds.
    trusted: bool,
    /// The `known` generation of a pass in which every entry the last glob component matched
    /// was a file the tailer follows: while the listing and the generation stay the same, a
    /// pass has nothing to find here and skips the entries.
    settled: Option<u64>,
    /// The last pass that walked the directory (a held listing not walked is dropped).
    pass: u64,
}

/// Finds files by glob.
#[derive(Debug)]
pub struct Discovery {
    sources: Vec<SourcePatterns>,
    bases: Vec<PathBuf>,
    roots: Vec<PathBuf>,
    shard: Option<Shard>,
    refused: HashSet<PathBuf>,
    listings: HashMap<PathBuf, Held>,
    passes: u64,
    /// Threads a pass makes its filesystem calls on (1: one after the other).
    io_threads: usize,
    /// Directories whose held listing was read again because their mtime changed, since the
    /// last [`Discovery::take_changed_dirs`].
    changed_dirs: Vec<PathBuf>,
    /// Passes from one full re-list to the next (see the module's doc).
    full_gap: u64,
    /// The pass of the next full re-list.
    next_full: u64,
    /// A directory's entries were seen to change while its mtime did not.
    mtimes_lie: bool,
    /// See [`RACY`] (tests lower it).
    racy: Duration,
}

fn has_meta(s: &str) -> bool {
    s.contains(['*', '?', '[', '{'])
}

fn compile(source_name: &str, glob: &str) -> Result<Pattern, DiscoveryError> {
    let bad = |message: String| DiscoveryError::Glob {
        source_name: source_name.into(),
        glob: glob.into(),
        message,
    };
    let mut base = PathBuf::from("/");
    let mut comps = Vec::new();
    for c in Path::new(glob).components() {
        let Component::Normal(c) = c else { continue };
        let s = c.to_string_lossy();
        if comps.is_empty() && !has_meta(&s) {
            base.push(c);
        } else if s == "**" {
            comps.push(Comp::AnyDepth);
        } else if has_meta(&s) {
            let m = GlobBuilder::new(&s)
                .literal_separator(true)
                .build()
                .map_err(|e| bad(e.to_string()))?;
            comps.push(Comp::Glob(m.compile_matcher()));
        } else {
            comps.push(Comp::Literal(c.to_os_string()));
        }
    }
    if comps.is_empty() {
        // A glob without meta characters names one file: its parent is the base.
        let name = base
            .file_name()
            .map(|n| n.to_os_string())
            .ok_or_else(|| bad("names no file".into()))?;
        base.pop();
        comps.push(Comp::Literal(name));
    }
    Ok(Pattern { base, comps })
}

impl Discovery {
    /// Compiles the sources' globs.
    pub fn new(
        sources: &[SourceConfig],
        shard: Option<Shard>,
    ) -> Result<Discovery, DiscoveryError> {
        let mut out = Vec::new();
        let mut bases = Vec::new();
        for s in sources {
            let name = s.name.get_ref();
            let include = s
                .include
                .iter()
                .map(|g| compile(name, g.get_ref()))
                .collect::<Result<Vec<_>, _>>()?;
            bases.extend(include.iter().map(|p| p.base.clone()));
            let mut ex = GlobSetBuilder::new();
            for g in &s.exclude {
                let glob = GlobBuilder::new(g.get_ref())
                    .literal_separator(false)
                    .build()
                    .map_err(|e| DiscoveryError::Glob {
                        source_name: name.clone(),
                        glob: g.get_ref().clone(),
                        message: e.to_string(),
                    })?;
                ex.add(glob);
            }
            let exclude = ex.build().map_err(|e| DiscoveryError::Glob {
                source_name: name.clone(),
                glob: "exclude".into(),
                message: e.to_string(),
            })?;
            out.push(SourcePatterns { include, exclude });
        }
        bases.sort();
        bases.dedup();
        let mut d = Discovery {
            sources: out,
            bases,
            roots: Vec::new(),
            shard,
            refused: HashSet::new(),
            listings: HashMap::new(),
            passes: 0,
            io_threads: 1,
            changed_dirs: Vec::new(),
            full_gap: FULL_RESCAN_EVERY,
            next_full: FULL_RESCAN_EVERY,
            mtimes_lie: false,
            racy: RACY,
        };
        d.refresh_roots();
        Ok(d)
    }

    /// Makes each pass's directory listings and `lstat`s on up to `threads` threads at once
    /// (default 1): worth it on network filesystems, where each call is a round trip.
    pub fn set_io_threads(&mut self, threads: usize) {
        self.io_threads = threads.max(1);
    }

    /// The literal bases of the include globs, as written (they may not exist yet).
    pub fn bases(&self) -> &[PathBuf] {
        &self.bases
    }

    /// The canonical include roots (bases that exist now).
    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    fn refresh_roots(&mut self) {
        let mut roots: Vec<PathBuf> = self
            .bases
            .iter()
            .filter_map(|b| std::fs::canonicalize(b).ok())
            .collect();
        roots.sort();
        roots.dedup();
        self.roots = roots;
    }

    /// How many passes apart every directory is re-listed regardless of its mtime now; the
    /// tailer re-checks the paths it follows at the same spacing, in `discover_interval`s.
    pub fn full_rescan_every(&self) -> u32 {
        u32::try_from(self.full_gap).unwrap_or(u32::MAX)
    }

    /// Whether directory mtimes are trusted to show every change here (no evidence against
    /// them yet; see [`Discovery::distrust_mtimes`]).
    pub fn mtimes_trusted(&self) -> bool {
        !self.mtimes_lie
    }

    /// Evidence that directory mtimes can't be trusted here: `dir`'s entries changed while
    /// its mtime (old enough to be trusted) did not. Full re-lists, and the tailer's path
    /// re-checks, stay at their shortest spacing from now on.
    pub fn distrust_mtimes(&mut self, dir: &Path) {
        if !self.mtimes_lie {
            tracing::warn!(
                dir = %dir.display(),
                every_passes = FULL_RESCAN_EVERY,
                "a directory's entries changed while its mtime did not: this filesystem does \
                 not keep directory times; every directory is re-listed, and every followed \
                 path re-checked, every `every_passes` discovery passes"
            );
        }
        self.mtimes_lie = true;
        self.full_gap = FULL_RESCAN_EVERY;
        self.next_full = self.next_full.min(self.passes + FULL_RESCAN_EVERY);
    }

    fn inside_roots(&self, p: &Path) -> bool {
        self.roots.iter().any(|r| p.starts_with(r))
    }

    /// Every file the globs name now, at most once each (the first source wins).
    pub fn scan(&mut self, events: &Events) -> Vec<Candidate> {
        self.scan_new(events, &|_| false, None)
    }

    /// Like [`Discovery::scan`], but paths for which `known` is true (files the tailer follows
    /// at that path) are neither stated nor returned: each would cost two or three round
    /// trips per pass on a network filesystem, and the tailer's own poll already notices
    /// when such a path names another file.
    ///
    /// The walk goes in waves: every step that needs no filesystem call is taken, then the
    /// calls the remaining steps wait for (directory listings, `lstat`s) are made together, on
    /// [`Discovery::set_io_threads`] threads, and the walk goes on with their results. A tree
    /// of 2,000 pod directories on a network volume thus costs a few rounds of overlapping
    /// round trips instead of thousands of sequential ones.
    ///
    /// `known_gen`: a number the caller changes whenever `known` may answer differently for
    /// some path (`None`: it may change at any time). While it stays the same, a directory
    /// whose listing did not change and whose matching entries were all known is not looked
    /// through again, except on a full re-list.
    pub fn scan_new(
        &mut self,
        events: &Events,
        known: &dyn Fn(&Path) -> bool,
        known_gen: Option<u64>,
    ) -> Vec<Candidate> {
        let t = Instant::now();
        self.refresh_roots();
        self.passes += 1;
        let full = self.passes >= self.next_full;
        let wall = wall_ns();
        // A directory whose entries a full re-list found changed under the same trusted mtime,
        // and that mtime.
        let mut hid_change: Option<(PathBuf, i64)> = None;
        let mut found: HashMap<PathBuf, Candidate> = HashMap::new();
        // Symlinked directories entered, per include pattern (symlink loops end there).
        let mut visited: HashMap<(usize, usize), HashSet<PathBuf>> = HashMap::new();
        let mut ready: Vec<Step> = Vec::new();
        for (si, s) in self.sources.iter().enumerate() {
            for (pi, p) in s.include.iter().enumerate() {
                ready.push(Step::walk(si, pi, p.base.clone(), 0, 0));
            }
        }
        loop {
            // Take every step that needs no call; keep those that wait for one.
            let mut to_list: Vec<Step> = Vec::new();
            let mut to_stat: Vec<Step> = Vec::new();
            while let Some(step) = ready.pop() {
                let (si, pi) = (step.si, step.pi);
                let ncomps = self.sources[si].include[pi].comps.len();
                if step.depth > MAX_DEPTH || step.ci >= ncomps {
                    continue;
                }
                let last = step.ci + 1 == ncomps;
                match step.at {
                    At::Dir => match &self.sources[si].include[pi].comps[step.ci] {
                        Comp::Literal(name) => {
                            let path = step.path.join(name);
                            ready.push(Step {
                                path,
                                at: At::Entry(None),
                                ..step
                            });
                        }
                        Comp::Glob(_) => {
                            to_list.push(step);
                        }
                        Comp::AnyDepth => {
                            // `**` matches zero directories here, or descends into each one.
                            ready.push(Step::walk(
                                si,
                                pi,
                                step.path.clone(),
                                step.ci + 1,
                                step.depth,
                            ));
                            to_list.push(step);
                        }
                    },
                    At::Entry(_) if last && known(&step.path) => {}
                    At::Entry(None) => to_stat.push(step),
                    At::Entry(Some(kind)) => {
                        let entered = visited.entry((si, pi)).or_default();
                        if let Some(next) =
                            self.enter(step, kind, last, events, entered, &mut found)
                        {
                            ready.push(next);
                        }
                    }
                    At::Into(kind) => {
                        let entered = visited.entry((si, pi)).or_default();
                        if self.descends(&step.path, kind, events, entered) {
                            ready.push(Step {
                                at: At::Dir,
                                ..step
                            });
                        }
                    }
                }
            }
            if to_list.is_empty() && to_stat.is_empty() {
                break;
            }
            // The calls, together.
            let mut dirs: Vec<(PathBuf, Option<i64>)> =
                to_list.iter().map(|s| (s.path.clone(), None)).collect();
            // By bytes: `Path`'s own order compares component by component.
            dirs.sort_unstable_by(|a, b| a.0.as_os_str().cmp(b.0.as_os_str()));
            dirs.dedup_by(|a, b| a.0.as_os_str() == b.0.as_os_str());
            for (dir, cached) in &mut dirs {
                *cached = (!full)
                    .then(|| {
                        self.listings
                            .get(dir)
                            .filter(|h| h.trusted)
                            .map(|h| h.mtime)
                    })
                    .flatten();
            }
            let listed = crate::par::map(&dirs, self.io_threads, |(dir, cached)| {
                fetch_listing(dir, *cached)
            });
            let kinds = crate::par::map(&to_stat, self.io_threads, |s| lstat_kind(&s.path));
            for ((dir, _), l) in dirs.into_iter().zip(listed) {
                match l {
                    Listing::Gone => {
                        self.listings.remove(&dir);
                    }
                    Listing::Unchanged => {
                        if let Some(held) = self.listings.get_mut(&dir) {
                            held.pass = self.passes;
                        }
                    }
                    Listing::Read(mtime, items) => {
                        let mut settled = None;
                        let mut seen = t;
                        if let Some(old) = self.listings.get(&dir) {
                            if old.mtime == mtime {
                                seen = old.seen;
                            }
                            if old.mtime != mtime || old.items != items {
                                self.changed_dirs.push(dir.clone());
                                if old.trusted && old.mtime == mtime && hid_change.is_none() {
                                    hid_change = Some((dir.clone(), mtime));
                                }
                            } else {
                                // Read again (young, or a full re-list) and the same.
                                settled = old.settled;
                            }
                        }
                        let trusted = old_enough(mtime, wall, t.duration_since(seen), self.racy);
                        let held = Held {
                            mtime,
                            items,
                            seen,
                            trusted,
                            settled,
                            pass: self.passes,
                        };
                        self.listings.insert(dir, held);
                    }
                }
            }
            // The walk goes on with their results.
            let mut scratch = PathBuf::new();
            let mut settled: Vec<(PathBuf, Option<u64>)> = Vec::new();
            for step in to_list {
                let Some(held) = self.listings.get(&step.path) else {
                    continue;
                };
                let comps = &self.sources[step.si].include[step.pi].comps;
                let comp = &comps[step.ci];
                let last = step.ci + 1 == comps.len();
                if last && !full && known_gen.is_some() && held.settled == known_gen {
                    continue;
                }
                let mut all_known = true;
                scratch.as_mut_os_string().clear();
                scratch.push(&step.path);
                for (name, kind) in &held.items {
                    let hit = matches!(comp, Comp::Glob(m) if m.is_match(name));
                    if last && hit {
                        // A file the tailer follows at this path is skipped (as `At::Entry`
                        // above would) before its path is even allocated: an idle pass meets
                        // every tracked file here.
                        scratch.push(name);
                        let skip = known(&scratch);
                        scratch.pop();
                        if skip {
                            continue;
                        }
                        all_known = false;
                    }
                    match comp {
                        Comp::Glob(_) if hit => ready.push(Step {
                            path: step.path.join(name),
                            at: At::Entry(Some(*kind)),
                            ..step
                        }),
                        // Into every subdirectory (`enter` checks that it is one), `**` still
                        // to match.
                        Comp::AnyDepth => ready.push(Step {
                            path: step.path.join(name),
                            at: At::Into(*kind),
                            depth: step.depth + 1,
                            ..step
                        }),
                        _ => {}
                    }
                }
                if last {
                    settled.push((step.path, known_gen.filter(|_| all_known)));
                }
            }
            for (dir, gen) in settled {
                if let Some(held) = self.listings.get_mut(&dir) {
                    held.settled = gen;
                }
            }
            for (step, kind) in to_stat.into_iter().zip(kinds) {
                if let Some(kind) = kind {
                    ready.push(Step {
                        at: At::Entry(Some(kind)),
                        ..step
                    });
                }
            }
        }
        // Forget listings of directories that are gone or no longer walked.
        let pass = self.passes;
        self.listings.retain(|_, held| held.pass == pass);
        // Unless the directory changed between its stat and its listing (an entry created in
        // between is no evidence): stated again, it still shows the mtime.
        if let Some((dir, mtime)) = hid_change {
            let again = std::fs::metadata(&dir).ok().map(|md| mtime_ns(&md));
            if again == Some(mtime) {
                self.distrust_mtimes(&dir);
            }
        }
        if full {
            if !self.mtimes_lie {
                self.full_gap = (self.full_gap * 2).min(FULL_RESCAN_MAX);
            }
            self.next_full = self.passes + self.full_gap;
        }
        events.discovery_full_rescan(self.full_gap);
        events.discovery(t.elapsed());
        let mut found: Vec<Candidate> = found.into_values().collect();
        found.sort_by(|a, b| a.path.cmp(&b.path));
        found
    }

    /// Where the walk goes from an entry of kind `kind` at `step` (its kind known): a file
    /// named by the last component is admitted into `found` (the first source wins); a
    /// directory (or a symlink to one inside the roots) is walked at the next component.
    fn enter(
        &mut self,
        step: Step,
        kind: Kind,
        last: bool,
        events: &Events,
        entered: &mut HashSet<PathBuf>,
        found: &mut HashMap<PathBuf, Candidate>,
    ) -> Option<Step> {
        if last {
            if matches!(kind, Kind::File | Kind::Symlink)
                && !self.sources[step.si].exclude.is_match(&step.path)
            {
                if let Some(c) = self.admit(step.si, &step.path, Some(kind), events) {
                    match found.get(&c.path) {
                        Some(prev) if prev.source <= c.source => {}
                        _ => {
                            found.insert(c.path.clone(), c);
                        }
                    }
                }
            }
            return None;
        }
        self.descends(&step.path, kind, events, entered)
            .then(|| Step::walk(step.si, step.pi, step.path, step.ci + 1, step.depth + 1))
    }

    /// Directories listed before whose listing changed (an entry created, removed or renamed)
    /// since the last call. The tailer checks what the paths it follows there name: a pass
    /// skips those paths, so a file renamed away and replaced would otherwise leave its
    /// successor unseen until the tailer's own check.
    pub fn take_changed_dirs(&mut self) -> Vec<PathBuf> {
        std::mem::take(&mut self.changed_dirs)
    }

    /// Whether passes list `dir` (a glob component is matched in it), so that a change to its
    /// entries shows in [`Discovery::take_changed_dirs`].
    pub fn lists(&self, dir: &Path) -> bool {
        self.listings.contains_key(dir)
    }

    /// Whether source `source` excludes `path`.
    pub fn excluded(&self, source: usize, path: &Path) -> bool {
        self.sources
            .get(source)
            .is_none_or(|s| s.exclude.is_match(path))
    }

    /// Whether `path` is a file the globs name now (used right after a rotation).
    pub fn check(&mut self, path: &Path, events: &Events) -> Option<Candidate> {
        for (si, s) in self.sources.iter().enumerate() {
            for p in &s.include {
                if matches_pattern(p, path) && !s.exclude.is_match(path) {
                    let c = self.admit(si, path, None, events)?;
                    return Some(c);
                }
            }
        }
        None
    }

    /// Applies the symlink policy, file type and shard to a path the walk named.
    ///
    /// `kind` is what the walk already knows of `path` (from its directory listing or an
    /// lstat): a regular file needs no more stats here (on a network volume each is a round
    /// trip); opening it checks again that it is a regular file inside the roots.
    fn admit(
        &mut self,
        source: usize,
        path: &Path,
        kind: Option<Kind>,
        events: &Events,
    ) -> Option<Candidate> {
        let open_path = if kind == Some(Kind::File) {
            path.to_path_buf()
        } else {
            let md = std::fs::symlink_metadata(path).ok()?;
            let open_path = if md.file_type().is_symlink() {
                self.resolve_symlink(path, events)?
            } else {
                path.to_path_buf()
            };
            if !std::fs::metadata(&open_path).ok()?.is_file() {
                return None;
            }
            open_path
        };
        if let Some(shard) = self.shard {
            if !in_shard(shard, path) {
                return None;
            }
        }
        Some(Candidate {
            path: path.to_path_buf(),
            open_path,
            source,
        })
    }

    /// The symlink's target if it lies inside the roots; otherwise refuses it (warning once).
    fn resolve_symlink(&mut self, path: &Path, events: &Events) -> Option<PathBuf> {
        match std::fs::canonicalize(path) {
            Ok(t) if self.inside_roots(&t) => Some(t),
            Ok(t) => {
                if self.refused.insert(path.to_path_buf()) {
                    tracing::warn!(path = %path.display(), target = %t.display(),
                        "refusing symlink to outside the include roots");
                    events.symlink_refused();
                }
                None
            }
            Err(_) => None, // dangling: nothing to read
        }
    }

    /// Whether the walk goes into `p`: a directory, or a symlink to a directory inside the
    /// roots not visited yet in this pass (symlink loops end here).
    fn descends(
        &mut self,
        p: &Path,
        kind: Kind,
        events: &Events,
        visited: &mut HashSet<PathBuf>,
    ) -> bool {
        match kind {
            Kind::Dir => true,
            Kind::Symlink => match self.resolve_symlink(p, events) {
                Some(t) => t.is_dir() && visited.insert(t),
                None => false,
            },
            _ => false,
        }
    }

    /// Opens a candidate for reading, refusing anything that is not a regular file inside the
    /// include roots once opened.
    pub fn open(&self, c: &Candidate) -> Result<File, DiscoveryError> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOATIME)
            .open(&c.open_path)
            .or_else(|e| {
                // O_NOATIME is refused on files we don't own without CAP_FOWNER.
                if e.raw_os_error() == Some(libc::EPERM) {
                    std::fs::OpenOptions::new()
                        .read(true)
                        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
                        .open(&c.open_path)
                } else {
                    Err(e)
                }
            })
            .map_err(|source| DiscoveryError::Open {
                path: c.path.clone(),
                source,
            })?;
        let md = f.metadata().map_err(|source| DiscoveryError::Open {
            path: c.path.clone(),
            source,
        })?;
        if !md.is_file() {
            return Err(DiscoveryError::Refused {
                path: c.path.clone(),
                why: "not a regular file".into(),
            });
        }
        if let Ok(real) = std::fs::read_link(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&f)
        )) {
            if !self.inside_roots(&real) {
                return Err(DiscoveryError::Refused {
                    path: c.path.clone(),
                    why: format!(
                        "it resolves to {} outside the include roots",
                        real.display()
                    ),
                });
            }
        }
        Ok(f)
    }
}

/// Whether `path` matches the pattern (used for single-path checks).
fn matches_pattern(p: &Pattern, path: &Path) -> bool {
    let Ok(rest) = path.strip_prefix(&p.base) else {
        return false;
    };
    let parts: Vec<OsString> = rest
        .components()
        .map(|c| c.as_os_str().to_os_string())
        .collect();
    fn m(comps: &[Comp], parts: &[OsString]) -> bool {
        match (comps.first(), parts.first()) {
            (None, None) => true,
            (Some(Comp::AnyDepth), _) => {
                m(&comps[1..], parts) || (!parts.is_empty() && m(comps, &parts[1..]))
            }
            (Some(Comp::Literal(l)), Some(x)) => l == x && m(&comps[1..], &parts[1..]),
            (Some(Comp::Glob(g)), Some(x)) => g.is_match(x) && m(&comps[1..], &parts[1..]),
            _ => false,
        }
    }
    m(&p.comps, &parts)
}

/// Whether the file's directory belongs to this shard (a stable hash of the directory path).
pub fn in_shard(shard: Shard, path: &Path) -> bool {
    let dir = path.parent().unwrap_or(path);
    let h = xxhash_rust::xxh3::xxh3_64(dir.as_os_str().as_encoded_bytes());
    h % u64::from(shard.count) == u64::from(shard.ordinal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn source(include: &[String], exclude: &[&str]) -> SourceConfig {
        let t = format!(
            "name = \"s\"\ninclude = [{}]\nexclude = [{}]\n",
            include
                .iter()
                .map(|g| format!("{g:?}"))
                .collect::<Vec<_>>()
                .join(","),
            exclude
                .iter()
                .map(|g| format!("{g:?}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        toml::from_str(&t).expect("source")
    }

    fn names(d: &mut Discovery, root: &Path) -> Vec<String> {
        let mut v: Vec<String> = d
            .scan(&Events::new())
            .into_iter()
            .map(|c| {
                c.path
                    .strip_prefix(root)
                    .expect("under root")
                    .display()
                    .to_string()
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn globs_find_pod_files_and_follow_changes() {
        let t = tempfile::tempdir().expect("tmp");
        let r = t.path();
        for pod in ["ns_a_1_2_n", "ns_b_1_2_n"] {
            std::fs::create_dir_all(r.join("nginx").join(pod)).expect("mkdir");
            std::fs::write(r.join("nginx").join(pod).join("access.log"), "x\n").expect("write");
            std::fs::write(r.join("nginx").join(pod).join("access.log.gz"), "x\n").expect("write");
        }
        let glob = format!("{}/nginx/*/access.log*", r.display());
        let mut d = Discovery::new(&[source(&[glob], &["**/*.gz"])], None).expect("new");
        assert_eq!(
            names(&mut d, r),
            vec!["nginx/ns_a_1_2_n/access.log", "nginx/ns_b_1_2_n/access.log"]
        );
        std::fs::create_dir_all(r.join("nginx/ns_c_1_2_n")).expect("mkdir");
        std::fs::write(r.join("nginx/ns_c_1_2_n/access.log"), "x\n").expect("write");
        assert_eq!(
            names(&mut d, r).len(),
            3,
            "a new pod directory is picked up"
        );
        std::fs::remove_dir_all(r.join("nginx/ns_a_1_2_n")).expect("rm");
        assert_eq!(names(&mut d, r).len(), 2, "a removed one is gone");
    }

    #[test]
    fn double_star_crosses_directories() {
        let t = tempfile::tempdir().expect("tmp");
        let r = t.path();
        std::fs::create_dir_all(r.join("a/b/c")).expect("mkdir");
        std::fs::write(r.join("top.log"), "").expect("w");
        std::fs::write(r.join("a/b/c/deep.log"), "").expect("w");
        std::fs::write(r.join("a/b/c/deep.txt"), "").expect("w");
        let mut d = Discovery::new(&[source(&[format!("{}/**/*.log", r.display())], &[])], None)
            .expect("new");
        assert_eq!(names(&mut d, r), vec!["a/b/c/deep.log", "top.log"]);
        assert!(d.check(&r.join("a/b/c/deep.log"), &Events::new()).is_some());
        assert!(d.check(&r.join("a/b/c/deep.txt"), &Events::new()).is_none());
    }

    #[test]
    fn a_walk_on_many_threads_finds_what_one_thread_finds() {
        let t = tempfile::tempdir().expect("tmp");
        let r = t.path().join("logs");
        for i in 0..60 {
            let pod = r.join(format!("ns_pod-{i}_10.0.0.{i}_10.1.0.1_node"));
            std::fs::create_dir_all(pod.join("sub/deeper")).expect("mkdir");
            std::fs::write(pod.join("access.log"), "x\n").expect("w");
            std::fs::write(pod.join("error.log"), "x\n").expect("w");
            std::fs::write(pod.join("access.log.gz"), "x\n").expect("w");
            std::fs::write(pod.join("sub/deeper/app.log"), "x\n").expect("w");
        }
        // A symlinked pod directory and file inside the roots, a loop, and one outside.
        symlink(
            r.join("ns_pod-1_10.0.0.1_10.1.0.1_node"),
            r.join("alias_pod"),
        )
        .expect("ln");
        symlink(
            r.join("ns_pod-2_10.0.0.2_10.1.0.1_node/access.log"),
            r.join("ns_pod-3_10.0.0.3_10.1.0.1_node/linked.log"),
        )
        .expect("ln");
        symlink(&r, r.join("ns_pod-4_10.0.0.4_10.1.0.1_node/sub/loop")).expect("ln");
        symlink("/etc", r.join("ns_pod-5_10.0.0.5_10.1.0.1_node/etc.log")).expect("ln");
        let sources = [
            source(&[format!("{}/*/access.log", r.display())], &[]),
            source(&[format!("{}/**/*.log", r.display())], &["**/error.log"]),
        ];
        let scan = |threads: usize| {
            let mut d = Discovery::new(&sources, None).expect("new");
            d.set_io_threads(threads);
            let mut passes = Vec::new();
            for _ in 0..FULL_RESCAN_EVERY + 1 {
                let found: Vec<(PathBuf, usize)> = d
                    .scan(&Events::new())
                    .into_iter()
                    .map(|c| (c.path, c.source))
                    .collect();
                passes.push(found);
            }
            passes
        };
        let one = scan(1);
        let many = scan(16);
        assert_eq!(one, many);
        let first = &one[0];
        assert!(first.len() > 120, "found {}", first.len());
        assert!(first
            .iter()
            .all(|(p, _)| !p.ends_with("error.log") && !p.ends_with("etc.log")));
        assert!(
            first.contains(&(r.join("alias_pod/access.log"), 0)),
            "first source wins"
        );
        assert!(first.contains(&(
            r.join("ns_pod-7_10.0.0.7_10.1.0.1_node/sub/deeper/app.log"),
            1
        )));
        assert!(first.iter().any(|(p, _)| p.ends_with("linked.log")));
        assert!(
            one.windows(2).all(|w| w[0] == w[1]),
            "passes agree, full re-list included"
        );
    }

    #[test]
    fn known_paths_are_skipped_not_stated() {
        let t = tempfile::tempdir().expect("tmp");
        let r = t.path();
        for pod in ["p1", "p2", "p3"] {
            std::fs::create_dir_all(r.join(pod)).expect("mkdir");
            std::fs::write(r.join(pod).join("app.log"), "x\n").expect("w");
        }
        let mut d = Discovery::new(
            &[source(&[format!("{}/*/app.log", r.display())], &[])],
            None,
        )
        .expect("new");
        let known = r.join("p2/app.log");
        let found = d.scan_new(&Events::new(), &|p| p == known, None);
        let mut got: Vec<_> = found.iter().map(|c| c.path.clone()).collect();
        got.sort();
        assert_eq!(got, vec![r.join("p1/app.log"), r.join("p3/app.log")]);
        // A known path is not even stated: a dangling "known" path is not an error either.
        std::fs::remove_file(r.join("p1/app.log")).expect("rm");
        let found = d.scan_new(&Events::new(), &|p| p.ends_with("app.log"), None);
        assert!(found.is_empty());
    }

    #[test]
    fn settled_directories_are_not_looked_through_until_they_or_the_known_set_change() {
        let t = tempfile::tempdir().expect("tmp");
        let r = t.path();
        for pod in ["p1", "p2"] {
            std::fs::create_dir_all(r.join(pod)).expect("mkdir");
            std::fs::write(r.join(pod).join("a.log"), "x\n").expect("w");
        }
        let mut d = Discovery::new(&[source(&[format!("{}/*/*.log", r.display())], &[])], None)
            .expect("new");
        // The directories whose files `known` was asked about, per pass.
        let asked = std::cell::RefCell::new(std::collections::BTreeSet::new());
        let pass = |d: &mut Discovery, follow_all: bool, gen: Option<u64>| {
            asked.borrow_mut().clear();
            let found = d.scan_new(
                &Events::new(),
                &|p: &Path| {
                    let pod = p.parent().and_then(Path::file_name).expect("pod");
                    asked
                        .borrow_mut()
                        .insert(pod.to_string_lossy().into_owned());
                    follow_all || p.ends_with("a.log")
                },
                gen,
            );
            let dirs: Vec<String> = asked.borrow().iter().cloned().collect();
            (found.into_iter().map(|c| c.path).collect::<Vec<_>>(), dirs)
        };
        assert_eq!(
            pass(&mut d, true, Some(1)),
            (vec![], vec!["p1".into(), "p2".into()])
        );
        assert_eq!(
            pass(&mut d, true, Some(1)),
            (vec![], vec![]),
            "settled: skipped"
        );
        // A new file changes its directory: only that one is looked through.
        std::fs::write(r.join("p2/b.log"), "y\n").expect("w");
        let new = vec![r.join("p2/b.log")];
        assert_eq!(
            pass(&mut d, false, Some(1)),
            (new.clone(), vec!["p2".into()])
        );
        // Not followed yet: p2 is not settled, and is looked through again.
        assert_eq!(pass(&mut d, false, Some(1)), (new, vec!["p2".into()]));
        // The known set changed: every directory is looked through.
        assert_eq!(
            pass(&mut d, true, Some(2)),
            (vec![], vec!["p1".into(), "p2".into()])
        );
        // Without a generation nothing is skipped.
        assert_eq!(pass(&mut d, true, None).1.len(), 2);
        assert_eq!(pass(&mut d, true, None).1.len(), 2);
    }

    #[test]
    fn symlinks_outside_roots_are_refused_inside_followed() {
        let t = tempfile::tempdir().expect("tmp");
        let outside = tempfile::tempdir().expect("tmp2");
        std::fs::write(outside.path().join("secret"), "root:x\n").expect("w");
        let r = t.path().join("logs");
        std::fs::create_dir_all(r.join("pod1")).expect("mkdir");
        std::fs::create_dir_all(r.join("pod2")).expect("mkdir");
        std::fs::create_dir_all(r.join("real")).expect("mkdir");
        std::fs::write(r.join("real/app.log"), "ok\n").expect("w");
        symlink(outside.path().join("secret"), r.join("pod1/app.log")).expect("ln");
        symlink(outside.path(), r.join("pod3")).expect("ln dir");
        symlink(r.join("real/app.log"), r.join("pod2/app.log")).expect("ln inside");
        let mut d = Discovery::new(
            &[source(&[format!("{}/*/app.log", r.display())], &[])],
            None,
        )
        .expect("new");
        let found = d.scan(&Events::new());
        let paths: Vec<_> = found
            .iter()
            .map(|c| c.path.strip_prefix(&r).expect("p").display().to_string())
            .collect();
        assert!(paths.contains(&"pod2/app.log".to_string()), "{paths:?}");
        assert!(paths.contains(&"real/app.log".to_string()));
        assert!(
            !paths
                .iter()
                .any(|p| p.starts_with("pod1") || p.starts_with("pod3")),
            "{paths:?}"
        );
        for c in &found {
            d.open(c).expect("inside files open");
        }
        // A candidate swapped to a symlink after the walk is refused at open.
        let swapped = Candidate {
            path: r.join("pod1/app.log"),
            open_path: r.join("pod1/app.log"),
            source: 0,
        };
        assert!(d.open(&swapped).is_err());
        let via_dir = Candidate {
            path: r.join("pod3/secret"),
            open_path: r.join("pod3/secret"),
            source: 0,
        };
        assert!(matches!(
            d.open(&via_dir),
            Err(DiscoveryError::Refused { .. })
        ));
    }

    #[test]
    fn shards_split_directories_and_cover_all() {
        let paths: Vec<PathBuf> = (0..300)
            .map(|i| PathBuf::from(format!("/v/nginx/ns_pod-{i}_1_2_n/access.log")))
            .collect();
        let mut counts = [0usize; 3];
        for p in &paths {
            let owners: Vec<u32> = (0..3)
                .filter(|&o| {
                    in_shard(
                        Shard {
                            ordinal: o,
                            count: 3,
                        },
                        p,
                    )
                })
                .collect();
            assert_eq!(owners.len(), 1);
            counts[owners[0] as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 50), "{counts:?}");
    }

    /// Sets `dir`'s mtime back to `t`: what a change within one timestamp granule, or a
    /// filesystem that does not keep directory times, leaves.
    fn set_mtime(dir: &Path, t: std::time::SystemTime) {
        let f = File::open(dir).expect("open dir");
        f.set_times(std::fs::FileTimes::new().set_modified(t))
            .expect("set mtime");
    }

    /// `r/p1/a.log`: returns `r` and the pod directory.
    fn one_pod(r: &Path) -> (&Path, PathBuf) {
        let pod = r.join("p1");
        std::fs::create_dir_all(&pod).expect("mkdir");
        std::fs::write(pod.join("a.log"), "x\n").expect("w");
        (r, pod)
    }

    fn mtime(dir: &Path) -> std::time::SystemTime {
        std::fs::metadata(dir)
            .and_then(|m| m.modified())
            .expect("mtime")
    }

    #[test]
    fn young_listings_are_read_again_though_their_mtime_stayed() {
        let t = tempfile::tempdir().expect("tmp");
        let (r, pod) = one_pod(t.path());
        let glob = format!("{}/*/*.log", r.display());
        for racy in [Duration::from_secs(3600), Duration::ZERO] {
            let _ = std::fs::remove_file(pod.join("b.log"));
            let mut d =
                Discovery::new(&[source(std::slice::from_ref(&glob), &[])], None).expect("new");
            d.racy = racy;
            let m = mtime(&pod);
            assert_eq!(names(&mut d, r), ["p1/a.log"]);
            // b.log comes within the granule of the mtime the listing was read at.
            std::fs::write(pod.join("b.log"), "y\n").expect("w");
            set_mtime(&pod, m);
            let got = names(&mut d, r);
            if racy.is_zero() {
                // The listing was trusted: the change shows at the next full re-list only.
                assert_eq!(got, ["p1/a.log"]);
            } else {
                assert_eq!(
                    got,
                    ["p1/a.log", "p1/b.log"],
                    "a young listing is read again"
                );
            }
        }
    }

    #[test]
    fn a_directory_stamped_in_the_future_is_trusted_once_seen_long_enough() {
        let t = tempfile::tempdir().expect("tmp");
        let (r, pod) = one_pod(t.path());
        // A file server whose clock runs an hour ahead of ours.
        set_mtime(
            &pod,
            std::time::SystemTime::now() + Duration::from_secs(3600),
        );
        let mut d = Discovery::new(&[source(&[format!("{}/*/*.log", r.display())], &[])], None)
            .expect("new");
        d.racy = Duration::from_millis(200);
        assert_eq!(names(&mut d, r), ["p1/a.log"]);
        assert!(
            !d.listings[&pod].trusted,
            "an mtime ahead of our clock is young"
        );
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(names(&mut d, r), ["p1/a.log"]);
        assert!(
            d.listings[&pod].trusted,
            "seen unchanged for longer than RACY"
        );
    }

    #[test]
    fn full_relists_back_off_while_mtimes_hold_and_stay_frequent_once_one_hid_a_change() {
        let t = tempfile::tempdir().expect("tmp");
        let (r, pod) = one_pod(t.path());
        let mut d = Discovery::new(&[source(&[format!("{}/*/*.log", r.display())], &[])], None)
            .expect("new");
        d.racy = Duration::ZERO;
        // Full re-lists at passes 12, 36 (12 + 24) and 84 (36 + 48), each finding nothing the
        // mtimes had not shown: the next comes 96 passes later, at 180.
        let mut gaps = Vec::new();
        for _ in 0..84 {
            assert_eq!(names(&mut d, r), ["p1/a.log"]);
            gaps.push(d.full_rescan_every());
        }
        assert_eq!((gaps[10], gaps[11], gaps[35], gaps[83]), (12, 24, 48, 96));
        // A new file under the same mtime: unseen until that re-list, found by it.
        let m = mtime(&pod);
        std::fs::write(pod.join("b.log"), "y\n").expect("w");
        set_mtime(&pod, m);
        for pass in 85..180 {
            assert_eq!(names(&mut d, r), ["p1/a.log"], "pass {pass}");
        }
        assert_eq!(names(&mut d, r), ["p1/a.log", "p1/b.log"], "pass 180");
        // Caught: re-lists every 12 passes from now on.
        assert_eq!(d.full_rescan_every(), 12);
        let m = mtime(&pod);
        std::fs::write(pod.join("c.log"), "z\n").expect("w");
        set_mtime(&pod, m);
        for _ in 181..192 {
            assert_eq!(names(&mut d, r).len(), 2);
        }
        assert_eq!(names(&mut d, r).len(), 3, "pass 192");
        for _ in 0..40 {
            names(&mut d, r);
        }
        assert_eq!(d.full_rescan_every(), 12);
    }
}
