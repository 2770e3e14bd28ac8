//! The Debian package: built with `cargo deb` exactly as the README says
//! (profile `deb`, set in `[package.metadata.deb]`), then inspected.
//!
//! - `dpkg-deb -c`: every installed path, its mode and owner, and nothing
//!   else; the shipped files are byte for byte their sources under `conf/`
//!   (the man pages gzipped).
//! - `dpkg-deb -f` / `-I`: name, version (Cargo.toml's, revision 1),
//!   architecture, Section `mail`, priority, Depends computed from the
//!   binaries (libc6), the description; conffiles exactly
//!   `/etc/httpmapd/httpmapd.toml`; maintainer scripts that enable and start
//!   the unit, restart it on upgrade and stop it on removal.
//! - The extracted binaries run, carry no debug info and no symbol table, and
//!   the extracted `httpmapd` accepts the extracted config with `--check`.
//! - The man pages render without a warning (`groff -man -ww` and `man -l`);
//!   every program in /usr/bin has one (man1 or man8) whose NAME line names
//!   it; httpmapd.toml(5) has an entry for every key the
//!   config parser accepts (its `Raw*` structs under src/config) and for no
//!   other, and for every key the shipped config shows; httpmapd-load(1) has
//!   an entry for every option `httpmapd-load --help` lists and names no
//!   option the program lacks.
//! - The unit runs the packaged paths with the settings the daemon relies on,
//!   and passes `systemd-analyze verify`.
//!
//! The package is built once per run (the tests share it) into
//! `target/tmp/deb-test-PID/`; the build itself goes to `target/deb/`, apart
//! from the release build. On a cold target directory it is one full build
//! (about a minute on two cores).
//!
//! Needs cargo-deb, dpkg-deb, dpkg-shlibdeps (dpkg-dev), readelf (binutils)
//! and groff (groff-base); the man page test also man (man-db), the unit
//! test also systemd-analyze (systemd). Without one of them these tests
//! fail, saying which is missing.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Instant;

const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");
const VERSION: &str = env!("CARGO_PKG_VERSION");
const DESCRIPTION: &str = env!("CARGO_PKG_DESCRIPTION");

/// The cargo profile the package is built with (`[profile.deb]`).
const PROFILE: &str = "deb";

/// What the package installs besides directories: path, mode, and the source
/// file it is a copy of (`None` for built binaries). Man pages are their
/// source gzipped.
const FILES: &[(&str, &str, Option<&str>)] = &[
    ("usr/bin/httpmapd", "-rwxr-xr-x", None),
    ("usr/bin/httpmapd-load", "-rwxr-xr-x", None),
    (
        "etc/httpmapd/httpmapd.toml",
        "-rw-r--r--",
        Some("conf/httpmapd.toml"),
    ),
    (
        "usr/lib/systemd/system/httpmapd.service",
        "-rw-r--r--",
        Some("conf/httpmapd.service"),
    ),
    (
        "usr/share/httpmapd/demo.map",
        "-rw-r--r--",
        Some("conf/demo.map"),
    ),
    (
        "usr/share/man/man8/httpmapd.8.gz",
        "-rw-r--r--",
        Some("conf/man/httpmapd.8"),
    ),
    (
        "usr/share/man/man5/httpmapd.toml.5.gz",
        "-rw-r--r--",
        Some("conf/man/httpmapd.toml.5"),
    ),
    (
        "usr/share/man/man1/httpmapd-load.1.gz",
        "-rw-r--r--",
        Some("conf/man/httpmapd-load.1"),
    ),
    (
        "usr/share/doc/httpmapd/README.md",
        "-rw-r--r--",
        Some("README.md"),
    ),
    (
        "usr/share/doc/httpmapd/copyright",
        "-rw-r--r--",
        Some("conf/debian/copyright"),
    ),
];

const BINARIES: &[&str] = &["usr/bin/httpmapd", "usr/bin/httpmapd-load"];
const CONFIG: &str = "etc/httpmapd/httpmapd.toml";
const UNIT: &str = "usr/lib/systemd/system/httpmapd.service";
const MAN_PAGES: &[&str] = &[
    "usr/share/man/man8/httpmapd.8.gz",
    "usr/share/man/man5/httpmapd.toml.5.gz",
    "usr/share/man/man1/httpmapd-load.1.gz",
];

/// Tools the package cannot be built or inspected without, and how to get
/// them.
const TOOLS: &[(&str, &str)] = &[
    ("cargo-deb", "cargo install cargo-deb --locked"),
    ("dpkg-deb", "the Debian package dpkg (apt-get install dpkg)"),
    (
        "dpkg-shlibdeps",
        "the Debian package dpkg-dev (apt-get install dpkg-dev)",
    ),
    (
        "readelf",
        "the Debian package binutils (apt-get install binutils)",
    ),
    (
        "groff",
        "the Debian package groff-base (apt-get install groff-base)",
    ),
];

// ---------------------------------------------------------------------------
// Tools, the build, helpers
// ---------------------------------------------------------------------------

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string())
}

/// Missing tools, with how to get them. cargo-deb counts as present when
/// `cargo deb` runs (cargo also finds it in `$CARGO_HOME/bin`).
fn missing_tools() -> &'static [(&'static str, &'static str)] {
    static MISSING: OnceLock<Vec<(&str, &str)>> = OnceLock::new();
    MISSING.get_or_init(|| {
        TOOLS
            .iter()
            .filter(|(tool, _)| {
                if *tool == "cargo-deb" {
                    !Command::new(cargo())
                        .args(["deb", "--version"])
                        .output()
                        .is_ok_and(|o| o.status.success())
                } else {
                    common::find_program(tool, &["$PATH"]).is_none()
                }
            })
            .copied()
            .collect()
    })
}

/// Fails the test when a tool the package needs is missing (see
/// [`common::missing`]).
fn require_tools() {
    let missing = missing_tools();
    if !missing.is_empty() {
        let names: Vec<&str> = missing.iter().map(|(tool, _)| *tool).collect();
        let how: Vec<String> = missing
            .iter()
            .map(|(tool, how)| format!("{tool}: {how}"))
            .collect();
        common::missing(&names.join(", "), &how.join("; "));
    }
}

/// Fails the test when man (man-db) is missing.
fn require_man() {
    if common::find_program("man", &["$PATH"]).is_none() {
        common::missing("man", "the Debian package man-db (apt-get install man-db)");
    }
}

/// The built package and its extracted tree.
struct Package {
    /// This run's scratch directory.
    dir: PathBuf,
    deb: PathBuf,
    /// `dpkg-deb -x` of the package.
    root: PathBuf,
}

impl Package {
    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }
}

/// The package, built on first use; every test shares it.
fn package() -> &'static Package {
    static PACKAGE: OnceLock<Result<Package, String>> = OnceLock::new();
    match PACKAGE.get_or_init(build_package) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

/// Removes the scratch directories of earlier runs whose process is gone.
fn remove_stale_scratch_dirs(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("deb-test-") else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn build_package() -> Result<Package, String> {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    remove_stale_scratch_dirs(tmp);
    let dir = tmp.join(format!("deb-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.join("out");
    std::fs::create_dir_all(&out).map_err(|e| format!("create {}: {e}", out.display()))?;

    eprintln!("building the Debian package: cargo deb --profile {PROFILE} (a full build when target/{PROFILE} is cold)");
    let started = Instant::now();
    let built = Command::new(cargo())
        .current_dir(MANIFEST_DIR)
        .args(["deb", "--profile", PROFILE, "--output"])
        .arg(format!("{}/", out.display()))
        .output()
        .map_err(|e| format!("cannot run cargo deb: {e}"))?;
    if !built.status.success() {
        return Err(format!(
            "cargo deb --profile {PROFILE} failed ({}):\n{}{}",
            built.status,
            String::from_utf8_lossy(&built.stdout),
            String::from_utf8_lossy(&built.stderr)
        ));
    }
    eprintln!("cargo deb took {:.1} s", started.elapsed().as_secs_f64());

    let mut made: Vec<PathBuf> = std::fs::read_dir(&out)
        .map_err(|e| format!("read {}: {e}", out.display()))?
        .flatten()
        .map(|e| e.path())
        .collect();
    made.sort();
    let expected_name = format!("httpmapd_{VERSION}-1_{}.deb", dpkg_architecture());
    let names: Vec<String> = made
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    if names != [expected_name.clone()] {
        return Err(format!(
            "cargo deb made {names:?}, expected exactly [{expected_name:?}] (no -dbgsym package)"
        ));
    }
    let deb = made.remove(0);

    let root = dir.join("root");
    let x = run(
        "dpkg-deb",
        &["-x".as_ref(), deb.as_os_str(), root.as_os_str()],
    );
    if !x.status.success() {
        return Err(format!("dpkg-deb -x failed: {}", stderr(&x)));
    }
    Ok(Package { dir, deb, root })
}

/// Runs a command to completion, capturing its output.
fn run<S: AsRef<std::ffi::OsStr>>(program: &str, args: &[S]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs a command that must succeed; returns its stdout.
fn run_ok<S: AsRef<std::ffi::OsStr>>(program: &str, args: &[S]) -> String {
    let o = run(program, args);
    let shown: Vec<String> = args
        .iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect();
    assert!(
        o.status.success(),
        "{program} {} failed ({}):\n{}{}",
        shown.join(" "),
        o.status,
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

fn dpkg_architecture() -> String {
    run_ok("dpkg", &["--print-architecture"]).trim().to_string()
}

fn source(rel: &str) -> Vec<u8> {
    let p = common::crate_file(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn gunzip(p: &Path) -> Vec<u8> {
    let o = run("gzip", &["-dc".as_ref(), p.as_os_str()]);
    assert!(
        o.status.success(),
        "gzip -dc {}: {}",
        p.display(),
        stderr(&o)
    );
    o.stdout
}

/// The fields of a control file: name → value (continuation lines joined
/// with '\n', each without its leading space).
fn control_fields(text: &str) -> BTreeMap<String, String> {
    let mut fields: BTreeMap<String, String> = BTreeMap::new();
    let mut last: Option<String> = None;
    for line in text.lines() {
        if let Some(cont) = line.strip_prefix(' ') {
            let name = last.as_ref().expect("a continuation line before any field");
            let v = fields.get_mut(name).unwrap();
            v.push('\n');
            v.push_str(cont);
        } else if let Some((name, value)) = line.split_once(':') {
            fields.insert(name.to_string(), value.trim().to_string());
            last = Some(name.to_string());
        } else if !line.trim().is_empty() {
            panic!("not a control file line: {line:?}");
        }
    }
    fields
}

/// A systemd unit as (section, key, value) triples, in order.
fn unit_directives(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_string();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not a unit file line: {line:?}"));
        out.push((section.clone(), k.trim().to_string(), v.trim().to_string()));
    }
    out
}

/// Every value of `section`'s `key`, in order.
fn values(unit: &[(String, String, String)], section: &str, key: &str) -> Vec<String> {
    unit.iter()
        .filter(|(s, k, _)| s == section && k == key)
        .map(|(_, _, v)| v.clone())
        .collect()
}

// ---------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------

#[test]
fn package_installs_exactly_the_expected_files() {
    require_tools();
    let p = package();
    let listing = run_ok("dpkg-deb", &["-c".as_ref(), p.deb.as_os_str()]);

    // mode, owner, size, date, time, path
    let mut files: BTreeMap<String, String> = BTreeMap::new();
    let mut dirs: BTreeMap<String, String> = BTreeMap::new();
    for line in listing.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert!(cols.len() == 6, "unexpected dpkg-deb -c line: {line:?}");
        let (mode, owner, path) = (cols[0], cols[1], cols[5]);
        assert!(
            owner == "root/root" || owner == "0/0",
            "{path} is owned by {owner}, not root"
        );
        let path = path
            .strip_prefix("./")
            .unwrap_or_else(|| panic!("path not under ./: {line:?}"));
        if mode.starts_with('d') {
            dirs.insert(path.trim_end_matches('/').to_string(), mode.to_string());
        } else {
            files.insert(path.to_string(), mode.to_string());
        }
    }

    let expected: BTreeMap<String, String> = FILES
        .iter()
        .map(|(p, m, _)| (p.to_string(), m.to_string()))
        .collect();
    assert_eq!(
        files, expected,
        "installed files and modes (left: in the package, right: expected)\n{listing}"
    );

    // Directories: exactly the ancestors of those files, all 0755.
    let mut expected_dirs = BTreeSet::new();
    for (p, _, _) in FILES {
        let mut a = Path::new(p).parent();
        while let Some(d) = a.filter(|d| !d.as_os_str().is_empty()) {
            expected_dirs.insert(d.to_string_lossy().into_owned());
            a = d.parent();
        }
    }
    assert_eq!(
        dirs.keys().cloned().collect::<BTreeSet<_>>(),
        expected_dirs,
        "directories in the package (left) and the ancestors of its files (right)"
    );
    for (d, mode) in &dirs {
        assert_eq!(mode, "drwxr-xr-x", "mode of directory {d}");
    }

    // Each shipped file is its source, as is (man pages: gzipped).
    for (path, _, src) in FILES {
        let Some(src) = src else { continue };
        let installed = p.path(path);
        let content = if path.ends_with(".gz") {
            assert_eq!(
                read(&installed).get(..2),
                Some(&[0x1f, 0x8b][..]),
                "{path} is not gzip data"
            );
            gunzip(&installed)
        } else {
            read(&installed)
        };
        assert!(
            content == source(src),
            "{path} in the package differs from {src}"
        );
    }
}

#[test]
fn control_fields_name_the_package_for_apt() {
    require_tools();
    let p = package();
    let text = run_ok("dpkg-deb", &["-f".as_ref(), p.deb.as_os_str()]);
    let f = control_fields(&text);

    let names: BTreeSet<&str> = f.keys().map(String::as_str).collect();
    let expected_names: BTreeSet<&str> = [
        "Package",
        "Version",
        "Architecture",
        "Section",
        "Priority",
        "Maintainer",
        "Installed-Size",
        "Depends",
        "Suggests",
        "Description",
    ]
    .into_iter()
    .collect();
    assert_eq!(names, expected_names, "control fields:\n{text}");

    assert_eq!(f["Package"], "httpmapd");
    assert_eq!(
        f["Version"],
        format!("{VERSION}-1"),
        "Cargo.toml's version, revision 1"
    );
    assert_eq!(f["Architecture"], dpkg_architecture());
    assert_eq!(f["Section"], "mail");
    assert_eq!(f["Priority"], "optional");
    assert_eq!(f["Suggests"], "postfix");
    assert!(!f["Maintainer"].is_empty());

    // $auto: dpkg-shlibdeps on the binaries. Rust's std needs only glibc
    // (libgcc_s is left out by cargo-deb: it is always there).
    let depends: Vec<&str> = f["Depends"].split(',').map(str::trim).collect();
    assert!(
        depends.len() == 1 && depends[0].starts_with("libc6 (>= ") && depends[0].ends_with(')'),
        "Depends should be exactly libc6 with a minimum version, found {:?}",
        f["Depends"]
    );

    // Description: the synopsis is one line under 80 characters (Debian
    // policy 3.4.1), Cargo.toml's description; the long description says
    // where the configuration is.
    let description = &f["Description"];
    let (synopsis, long) = description.split_once('\n').unwrap_or((description, ""));
    assert_eq!(
        synopsis, DESCRIPTION,
        "the synopsis is Cargo.toml's description, whole on one line (cargo-deb wraps a description of more than 79 characters into the long description)"
    );
    assert!(
        synopsis.len() < 80,
        "synopsis of {} characters: {synopsis:?}",
        synopsis.len()
    );
    assert!(
        long.contains("/etc/httpmapd/httpmapd.toml") && long.contains("httpmapd.toml(5)"),
        "the long description names the configuration file and its man page:\n{long}"
    );
}

#[test]
fn control_archive_has_the_conffile_and_systemd_scripts() {
    require_tools();
    let p = package();
    assert_eq!(
        run_ok(
            "dpkg-deb",
            &["-I".as_ref(), p.deb.as_os_str(), "conffiles".as_ref()]
        ),
        "/etc/httpmapd/httpmapd.toml\n",
        "conffiles"
    );

    let control = p.dir.join("control");
    let _ = std::fs::remove_dir_all(&control);
    run_ok(
        "dpkg-deb",
        &["-e".as_ref(), p.deb.as_os_str(), control.as_os_str()],
    );
    let members: BTreeSet<String> = std::fs::read_dir(&control)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let expected: BTreeSet<String> = ["conffiles", "control", "postinst", "postrm", "prerm"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(members, expected, "control archive members");

    let script = |name: &str| -> String {
        let path = control.join(name);
        let o = run("sh", &["-n".as_ref(), path.as_os_str()]);
        assert!(o.status.success(), "{name} is not valid sh: {}", stderr(&o));
        String::from_utf8(read(&path)).unwrap()
    };
    let postinst = script("postinst");
    let prerm = script("prerm");
    let postrm = script("postrm");
    for (name, text, needle) in [
        // Enabled on install (unless the admin disabled it)...
        (
            "postinst",
            &postinst,
            "deb-systemd-helper enable httpmapd.service",
        ),
        // ...started on install, restarted (not stopped first) on upgrade.
        ("postinst", &postinst, "_dh_action=start"),
        ("postinst", &postinst, "_dh_action=restart"),
        (
            "postinst",
            &postinst,
            "deb-systemd-invoke $_dh_action httpmapd.service",
        ),
        // Stopped on removal only: an upgrade does not stop it in prerm.
        ("prerm", &prerm, "[ \"$1\" = remove ]"),
        ("prerm", &prerm, "deb-systemd-invoke stop httpmapd.service"),
        (
            "postrm",
            &postrm,
            "deb-systemd-helper purge httpmapd.service",
        ),
    ] {
        assert!(text.contains(needle), "{name} lacks {needle:?}:\n{text}");
    }
}

#[test]
fn packaged_binaries_run_and_accept_the_packaged_config() {
    require_tools();
    let p = package();
    let httpmapd = p.path("usr/bin/httpmapd");
    let config = p.path(CONFIG);
    let o = run(
        httpmapd.to_str().unwrap(),
        &["-c".as_ref(), config.as_os_str(), "--check".as_ref()],
    );
    assert!(
        o.status.success(),
        "the packaged httpmapd refuses the packaged {CONFIG} ({}):\n{}{}",
        o.status,
        stdout(&o),
        stderr(&o)
    );
    assert!(stdout(&o).contains("ok"), "--check output: {}", stdout(&o));
    assert_eq!(stderr(&o), "", "--check printed problems");

    for bin in BINARIES {
        let o = run(p.path(bin).to_str().unwrap(), &["--help"]);
        assert!(
            o.status.success() && !stdout(&o).is_empty(),
            "{bin} --help ({}):\n{}{}",
            o.status,
            stdout(&o),
            stderr(&o)
        );
    }
    let v = run_ok(httpmapd.to_str().unwrap(), &["--version"]);
    assert!(
        v.contains(VERSION),
        "httpmapd --version says {v:?}, not {VERSION}"
    );
}

#[test]
fn packaged_binaries_carry_no_debug_info_or_symbols() {
    require_tools();
    let p = package();
    for bin in BINARIES {
        let path = p.path(bin);
        let headers = run_ok("readelf", &["-S".as_ref(), "-W".as_ref(), path.as_os_str()]);
        // Section header lines look like "  [12] .rodata  PROGBITS ...".
        let sections: Vec<&str> = headers
            .lines()
            .filter_map(|l| {
                let rest = l.trim_start().strip_prefix('[')?;
                let (_, rest) = rest.split_once(']')?;
                rest.split_whitespace().next()
            })
            .collect();
        assert!(
            sections.contains(&".text"),
            "no section list from readelf for {bin}:\n{headers}"
        );
        let unstripped: Vec<&&str> = sections
            .iter()
            .filter(|s| s.starts_with(".debug") || s.starts_with(".zdebug") || **s == ".symtab")
            .collect();
        assert!(
            unstripped.is_empty(),
            "{bin} is not stripped: it has {unstripped:?}"
        );
    }
}

#[test]
fn man_pages_render_without_warnings() {
    require_tools();
    require_man();
    let p = package();
    let scratch = p.dir.join("man");
    std::fs::create_dir_all(&scratch).unwrap();
    for page in MAN_PAGES {
        let name = Path::new(page).file_stem().unwrap();
        let plain = scratch.join(name);
        std::fs::write(&plain, gunzip(&p.path(page))).unwrap();
        for device in [None, Some("-Tutf8")] {
            let mut args: Vec<&std::ffi::OsStr> =
                vec!["-man".as_ref(), "-ww".as_ref(), "-z".as_ref()];
            if let Some(d) = device {
                args.push(d.as_ref());
            }
            args.push(plain.as_os_str());
            let o = run("groff", &args);
            assert!(
                o.status.success() && o.stderr.is_empty(),
                "groff -man -ww {} {page}: {}\n{}",
                device.unwrap_or(""),
                o.status,
                stderr(&o)
            );
        }
        let o = Command::new("man")
            .arg("-l")
            .arg(p.path(page))
            .env("MANWIDTH", "80")
            .env("MAN_KEEP_FORMATTING", "0")
            .output()
            .unwrap();
        assert!(
            o.status.success() && o.stderr.is_empty() && !o.stdout.is_empty(),
            "man -l {page}: {}\n{}",
            o.status,
            stderr(&o)
        );
    }
}

#[test]
fn every_program_has_a_man_page() {
    require_tools();
    let p = package();
    let mut programs: Vec<String> = std::fs::read_dir(p.path("usr/bin"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    programs.sort();
    let mut expected: Vec<String> = BINARIES
        .iter()
        .map(|b| b.strip_prefix("usr/bin/").unwrap().to_string())
        .collect();
    expected.sort();
    assert_eq!(programs, expected, "the programs in /usr/bin");
    for name in &programs {
        // NAME.1 or NAME.8 (gzipped or not) in the directory of its section.
        let pages: Vec<String> = ["1", "8"]
            .iter()
            .flat_map(|section| {
                [
                    format!("usr/share/man/man{section}/{name}.{section}"),
                    format!("usr/share/man/man{section}/{name}.{section}.gz"),
                ]
            })
            .filter(|page| p.path(page).is_file())
            .collect();
        assert!(
            pages.len() == 1,
            "/usr/bin/{name} should have one man page, in usr/share/man/man1 or man8, found {pages:?}"
        );
        let page = &pages[0];
        assert!(
            MAN_PAGES.contains(&page.as_str()),
            "{page} is not in MAN_PAGES, so its rendering is not checked"
        );
        // What whatis(1) and apropos(1) show: "NAME \- summary".
        let roff = String::from_utf8(if page.ends_with(".gz") {
            gunzip(&p.path(page))
        } else {
            read(&p.path(page))
        })
        .unwrap();
        let name_line = roff
            .lines()
            .skip_while(|l| *l != ".SH NAME")
            .nth(1)
            .unwrap_or_else(|| panic!("{page} has no NAME section"))
            .replace("\\-", "-");
        assert!(
            name_line.starts_with(&format!("{name} - ")),
            "{page}: the NAME line should be \"{name} \\- summary\", not {name_line:?}"
        );
    }
}

/// The options an option listing of clap's `--help` defines, as
/// (short, long): lines such as `  -c, --connections <N>  Connections` and
/// `      --depth <N>  ...` (not the options its prose mentions).
fn help_options(help: &str) -> Vec<(Option<String>, String)> {
    help.lines()
        .filter(|l| l.starts_with("  ") && l.trim_start().starts_with('-'))
        .map(|l| {
            let mut words = l.split_whitespace();
            let first = words.next().unwrap();
            let (short, long) = match first.strip_suffix(',') {
                Some(short) => (Some(short.to_string()), words.next().unwrap_or("")),
                None => (None, first),
            };
            assert!(
                long.starts_with("--") && short.as_deref().is_none_or(|s| s.len() == 2),
                "not an option line of --help: {l:?}"
            );
            (short, long.to_string())
        })
        .collect()
}

/// The option names (`-x`, `--name`) a piece of roff writes, comments
/// left out: `\-` read as `-`, font escapes dropped.
fn roff_options(roff: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in roff.lines() {
        if line.starts_with(".\\\"") {
            continue;
        }
        let line = line.split("\\\"").next().unwrap();
        let mut text = line.replace("\\-", "-");
        for font in ["\\fB", "\\fI", "\\fR", "\\fP"] {
            text = text.replace(font, "");
        }
        let b = text.as_bytes();
        for i in 0..b.len() {
            let starts_word = i == 0 || matches!(b[i - 1], b' ' | b'(' | b'[' | b'"' | b'|');
            if b[i] != b'-' || !starts_word {
                continue;
            }
            if b.get(i + 1) == Some(&b'-') {
                // --name
                let len = b[i + 2..]
                    .iter()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || **c == b'-')
                    .count();
                let name = text[i..i + 2 + len].trim_end_matches('-');
                if name.len() > 2 {
                    out.push(name.to_string());
                }
            } else if b.get(i + 1).is_some_and(u8::is_ascii_alphabetic)
                && !b.get(i + 2).is_some_and(u8::is_ascii_alphanumeric)
            {
                // -x
                out.push(text[i..i + 2].to_string());
            }
        }
    }
    out
}

/// Options of other commands httpmapd-load(1) cites: the command (as run
/// with the `httpmapd` binary) and its options, checked against its --help.
const LOAD_PAGE_FOREIGN_OPTIONS: &[(&[&str], &[&str])] = &[(&["backend"], &["--listen", "--map"])];

#[test]
fn load_man_page_documents_every_option() {
    let roff = String::from_utf8(source("conf/man/httpmapd-load.1")).unwrap();
    let help = Command::new(env!("CARGO_BIN_EXE_httpmapd-load"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        help.status.success(),
        "httpmapd-load --help: {}",
        help.status
    );
    let options = help_options(&stdout(&help));
    assert!(
        options.len() > 20,
        "parsing httpmapd-load --help found only {options:?}"
    );

    // Each option has an entry under OPTIONS (a .TP head naming it, with its
    // short form if it has one).
    let mut section = "";
    let mut heads: Vec<Vec<String>> = Vec::new();
    let mut after_tp = false;
    for line in roff.lines() {
        if let Some(s) = line.strip_prefix(".SH ") {
            section = s;
        } else if after_tp && section == "OPTIONS" {
            heads.push(roff_options(line));
        }
        after_tp = line == ".TP";
    }
    for (short, long) in &options {
        let head = heads.iter().find(|h| h.contains(long)).unwrap_or_else(|| {
            panic!("httpmapd-load(1) has no OPTIONS entry for {long}, which --help lists")
        });
        let page_short = head.iter().find(|o| !o.starts_with("--"));
        assert_eq!(
            page_short,
            short.as_ref(),
            "the short form of {long} (left: httpmapd-load(1), right: --help)"
        );
    }

    // And every option the page names anywhere is one of them, or one of
    // another command's it cites (which that command has).
    let mut known: BTreeSet<String> = options
        .iter()
        .flat_map(|(s, l)| s.iter().chain([l]).cloned())
        .collect();
    for (command, foreign) in LOAD_PAGE_FOREIGN_OPTIONS {
        let o = Command::new(env!("CARGO_BIN_EXE_httpmapd"))
            .args(command.iter())
            .arg("--help")
            .output()
            .unwrap();
        let theirs: Vec<String> = help_options(&stdout(&o))
            .into_iter()
            .map(|(_, l)| l)
            .collect();
        for f in *foreign {
            assert!(
                theirs.iter().any(|l| l == f),
                "httpmapd {} --help does not list {f}, which httpmapd-load(1) cites",
                command.join(" ")
            );
            assert!(
                roff_options(&roff).iter().any(|o| o == f),
                "httpmapd-load(1) no longer cites {f}: drop it from LOAD_PAGE_FOREIGN_OPTIONS"
            );
            known.insert(f.to_string());
        }
    }
    let unknown: BTreeSet<String> = roff_options(&roff)
        .into_iter()
        .filter(|o| !known.contains(o))
        .collect();
    assert!(
        unknown.is_empty(),
        "httpmapd-load(1) names {unknown:?}, which httpmapd-load --help does not list"
    );
}

/// The `.TP` entry names of each `.SH` section of a man page:
/// `.TP` / `.BR key " (default: ...)"` or `.BR key1 ", " key2 " (default ...)"`.
fn man_entries(roff: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut section = String::new();
    let mut after_tp = false;
    for line in roff.lines() {
        if let Some(s) = line.strip_prefix(".SH ") {
            section = s.replace("\\fI", "").replace("\\fP", "");
            after_tp = false;
            continue;
        }
        if after_tp {
            if let Some(args) = line
                .strip_prefix(".BR ")
                .or_else(|| line.strip_prefix(".B "))
            {
                // Unquoted arguments are key names; quoted ones are text.
                let mut rest = args.trim();
                while !rest.is_empty() {
                    if let Some(q) = rest.strip_prefix('"') {
                        let end = q.find('"').map_or(q.len(), |i| i + 1);
                        rest = q[end.min(q.len())..].trim_start();
                    } else {
                        let end = rest.find(' ').unwrap_or(rest.len());
                        out.entry(section.clone())
                            .or_default()
                            .insert(rest[..end].to_string());
                        rest = rest[end..].trim_start();
                    }
                }
            }
        }
        after_tp = line == ".TP";
    }
    out
}

/// The keys conf/httpmapd.toml shows per section (set or commented out as
/// `# key = ...`), sections named as in the man page.
fn shipped_config_keys() -> BTreeMap<String, BTreeSet<String>> {
    let text = String::from_utf8(source("conf/httpmapd.toml")).unwrap();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut section = None;
    for line in text.lines() {
        let active = line.trim();
        let l = active.strip_prefix('#').map_or(active, str::trim);
        if let Some(s) = l.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            // "[maps.access]" commented out is another map: same section.
            section = Some(if s.starts_with("maps.") {
                "[maps.name] SECTIONS".to_string()
            } else if s.starts_with("policies.") {
                "[policies.name] SECTIONS".to_string()
            } else {
                format!("[{s}] SECTION")
            });
            continue;
        }
        let Some((key, _)) = l.split_once(" = ") else {
            continue;
        };
        if key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
            let section = section
                .clone()
                .unwrap_or_else(|| panic!("key {key} before any section"));
            out.entry(section).or_default().insert(key.to_string());
        }
    }
    out
}

/// The keys the config parser accepts: the fields of its raw TOML structs
/// (`RawDaemon`, `RawCache`, `RawMap`, `deny_unknown_fields`), found in the
/// source under src/config*, sections named as in the man page.
fn accepted_config_keys() -> BTreeMap<String, BTreeSet<String>> {
    let mut sources = String::new();
    let mut pending = vec![Path::new(MANIFEST_DIR).join("src")];
    while let Some(p) = pending.pop() {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if p.is_dir() && (name == "src" || name == "config") {
            pending.extend(std::fs::read_dir(&p).unwrap().flatten().map(|e| e.path()));
        } else if name == "config.rs"
            || (name.ends_with(".rs") && p.parent().unwrap().ends_with("config"))
        {
            sources.push_str(&String::from_utf8(read(&p)).unwrap());
        }
    }
    let mut out = BTreeMap::new();
    for (raw, section) in [
        ("RawDaemon", "[daemon] SECTION"),
        ("RawCache", "[cache] SECTION"),
        ("RawMap", "[maps.name] SECTIONS"),
        ("RawSharedCache", "[shared_cache] SECTION"),
        ("RawPolicy", "[policies.name] SECTIONS"),
    ] {
        let start = sources
            .find(&format!("struct {raw} {{"))
            .unwrap_or_else(|| panic!("struct {raw} not found under src/config*: where does the config parser keep its keys now?"));
        let body = &sources[start..];
        let body = &body[body.find('{').unwrap() + 1..body.find('}').unwrap()];
        let keys: BTreeSet<String> = body
            .lines()
            .filter_map(|l| {
                let l = l.trim();
                let l = l
                    .strip_prefix("pub(super) ")
                    .or_else(|| l.strip_prefix("pub(crate) "))
                    .or_else(|| l.strip_prefix("pub "))
                    .unwrap_or(l);
                let (name, _) = l.split_once(':')?;
                (!name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
                    .then(|| name.to_string())
            })
            .collect();
        assert!(keys.len() > 5, "struct {raw}: only {keys:?}");
        out.insert(section.to_string(), keys);
    }
    // A policy's keys shared with maps are documented once, with the maps
    // (the policy section says they work as for maps).
    let map_keys = out["[maps.name] SECTIONS"].clone();
    if let Some(p) = out.get_mut("[policies.name] SECTIONS") {
        p.retain(|k| !map_keys.contains(k) || k == "result" || k == "ttl");
    }
    out
}

#[test]
fn config_man_page_describes_every_key() {
    let roff = String::from_utf8(source("conf/man/httpmapd.toml.5")).unwrap();
    let documented = man_entries(&roff);
    let shipped = shipped_config_keys();
    assert!(
        shipped.len() == 5 && shipped.values().all(|k| !k.is_empty()),
        "parsing conf/httpmapd.toml found {shipped:?}"
    );
    let accepted = accepted_config_keys();
    for (what, keys_by_section) in [
        ("the config parser accepts", &accepted),
        ("conf/httpmapd.toml shows", &shipped),
    ] {
        for (section, keys) in keys_by_section {
            let have = documented.get(section).cloned().unwrap_or_default();
            let missing: Vec<&String> = keys.difference(&have).collect();
            assert!(
                missing.is_empty(),
                "httpmapd.toml(5) section {section:?} lacks {missing:?}, which {what} (the page has {have:?})"
            );
        }
    }
    // And it documents no key the parser refuses.
    for (section, have) in &documented {
        if let Some(keys) = accepted.get(section) {
            if section == "[policies.name] SECTIONS" {
                continue; // it names the map keys that work there too
            }
            let unknown: Vec<&String> = have
                .iter()
                .filter(|k| k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
                .filter(|k| !keys.contains(*k))
                .collect();
            assert!(
                unknown.is_empty(),
                "httpmapd.toml(5) section {section:?} documents {unknown:?}, which the config parser does not accept"
            );
        }
    }
}

#[test]
fn unit_runs_the_packaged_paths() {
    require_tools();
    let p = package();
    let text = String::from_utf8(read(&p.path(UNIT))).unwrap();
    let unit = unit_directives(&text);
    let one = |section: &str, key: &str| -> String {
        let v = values(&unit, section, key);
        assert_eq!(v.len(), 1, "[{section}] {key}= should be set once: {v:?}");
        v[0].clone()
    };

    let docs = values(&unit, "Unit", "Documentation").join(" ");
    for d in ["man:httpmapd(8)", "man:httpmapd.toml(5)"] {
        assert!(
            docs.split(' ').any(|w| w == d),
            "Documentation= lacks {d}: {docs}"
        );
    }
    let before = values(&unit, "Unit", "Before").join(" ");
    for u in ["postfix.service", "postfix@-.service"] {
        assert!(
            before.split(' ').any(|w| w == u),
            "Before= lacks {u}: {before}"
        );
    }

    let check = "/usr/bin/httpmapd -c /etc/httpmapd/httpmapd.toml --check";
    assert_eq!(one("Service", "Type"), "notify");
    assert_eq!(one("Service", "NotifyAccess"), "main");
    assert_eq!(one("Service", "SyslogIdentifier"), "httpmapd");
    assert_eq!(one("Service", "SyslogFacility"), "mail");
    assert_eq!(one("Service", "ExecStartPre"), check);
    assert_eq!(
        one("Service", "ExecStart"),
        "/usr/bin/httpmapd -c /etc/httpmapd/httpmapd.toml"
    );
    assert_eq!(
        values(&unit, "Service", "ExecReload"),
        [check, "/bin/kill -HUP $MAINPID"],
        "reload: check the file, then SIGHUP"
    );
    assert_eq!(one("Service", "DynamicUser"), "yes");
    assert_eq!(one("Service", "ProtectSystem"), "strict");
    assert_eq!(one("Service", "NoNewPrivileges"), "yes");
    assert_eq!(one("Install", "WantedBy"), "multi-user.target");

    // Every file of ours the unit names is in the package.
    for (_, key, value) in &unit {
        if !key.starts_with("Exec") {
            continue;
        }
        for word in value.split_whitespace() {
            if word.starts_with("/usr/") || word.starts_with("/etc/") {
                assert!(
                    p.path(&word[1..]).is_file(),
                    "{key}={value}: {word} is not in the package"
                );
            }
        }
    }
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    require_tools();
    require_man();
    if common::find_program("systemd-analyze", &["$PATH"]).is_none() {
        common::missing(
            "systemd-analyze",
            "the Debian package systemd (apt-get install systemd)",
        );
    }
    let p = package();
    // A root holding the unit, the binary it runs and the man pages its
    // Documentation= names, plus the one unit every service depends on
    // (verify resolves dependencies inside --root).
    let root = p.dir.join("verify-root");
    let _ = std::fs::remove_dir_all(&root);
    for rel in [UNIT, "usr/bin/httpmapd", MAN_PAGES[0], MAN_PAGES[1]] {
        let to = root.join(rel);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(p.path(rel), &to).unwrap();
    }
    std::fs::write(
        root.join("usr/lib/systemd/system/sysinit.target"),
        "[Unit]\nDescription=stand-in for the test\n",
    )
    .unwrap();

    let o = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg("--man=yes")
        .arg(format!("/{UNIT}"))
        .env("MANPATH", root.join("usr/share/man"))
        .output()
        .unwrap();
    // systemd-analyze reports unknown keys and bad values as warnings with
    // exit 0: any output is a failure.
    assert!(
        o.status.success() && o.stderr.is_empty() && o.stdout.is_empty(),
        "systemd-analyze verify {UNIT} ({}):\n{}{}",
        o.status,
        stdout(&o),
        stderr(&o)
    );
}
