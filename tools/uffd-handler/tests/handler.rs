//! The handler against a VMM played by the test: anonymous memory
//! registered with a userfaultfd, the handshake sent as Firecracker sends
//! it, every page read back and compared with the memory file.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use ember_uffd::userfaultfd::Uffd;
use ember_uffd::{
    create_vmm_uffd, error_chain, receive_handshake, send_handshake, serve, Error,
    GuestRegionUffdMapping, MemoryFile, ServeStats,
};
use vmm_sys_util::tempdir::TempDir;

const PAGE: usize = 4096;
/// Region A's and region B's page counts; B follows A in the file.
const PAGES_A: usize = 16;
const PAGES_B: usize = 8;
const PAGES: usize = PAGES_A + PAGES_B;

/// Page `i`'s contents: a hole of the sparse file, written zeros, or a
/// pattern that differs in every page and has no zero byte.
fn page_bytes(i: usize) -> Option<Vec<u8>> {
    match i {
        _ if i % 5 == 3 => None,
        _ if i % 7 == 2 => Some(vec![0; PAGE]),
        _ => Some(
            (0..PAGE)
                .map(|j| u8::try_from((i * 31 + j) % 255 + 1).unwrap())
                .collect(),
        ),
    }
}

/// Writes the memory file; returns its path and its full contents.
fn memory_file(dir: &Path) -> (PathBuf, Vec<u8>) {
    let path = dir.join("mem");
    let file = File::create(&path).unwrap();
    file.set_len((PAGES * PAGE) as u64).unwrap();
    let mut all = vec![0; PAGES * PAGE];
    for i in 0..PAGES {
        if let Some(bytes) = page_bytes(i) {
            file.write_all_at(&bytes, (i * PAGE) as u64).unwrap();
            all[i * PAGE..(i + 1) * PAGE].copy_from_slice(&bytes);
        }
    }
    (path, all)
}

/// The VMM's uffd, as Firecracker makes it; user-mode-only if that is all
/// we may have; `None` (the test skips) if there is none.
fn vmm_uffd() -> Option<Uffd> {
    let first = match create_vmm_uffd() {
        Ok(uffd) => return Some(uffd),
        Err(e) => e,
    };
    match user_mode_only_uffd() {
        Ok(uffd) => Some(uffd),
        Err(e) => {
            eprintln!("SKIPPED: userfaultfd unavailable: {first:?}; user-mode-only: {e}");
            None
        }
    }
}

/// `userfaultfd(UFFD_USER_MODE_ONLY)` and `UFFDIO_API`, which an
/// unprivileged process may do even when `vm.unprivileged_userfaultfd` is 0.
fn user_mode_only_uffd() -> std::io::Result<Uffd> {
    use std::os::fd::{FromRawFd, OwnedFd, RawFd};
    use userfaultfd_sys as sys;

    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK | sys::UFFD_USER_MODE_ONLY as libc::c_int;
    // SAFETY: the syscall takes only flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(std::io::Error::other)?;
    // SAFETY: `fd` is the new userfaultfd, owned by nothing else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut api = sys::uffdio_api {
        api: sys::UFFD_API,
        features: sys::UFFD_FEATURE_EVENT_REMOVE,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes one `uffdio_api`, which `api` is.
    if unsafe { libc::ioctl(owned.as_raw_fd(), sys::UFFDIO_API as _, &mut api) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the fd is an initialised userfaultfd whose ownership moves to
    // the Uffd.
    Ok(unsafe { Uffd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(owned)) })
}

/// Anonymous private memory, the VMM's guest RAM.
struct Anon {
    ptr: *mut u8,
    len: usize,
}

impl Anon {
    fn new(pages: usize) -> Self {
        let len = pages * PAGE;
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        Self {
            ptr: ptr.cast(),
            len,
        }
    }

    fn register(&self, uffd: &Uffd) {
        uffd.register(self.ptr.cast(), self.len).unwrap();
    }

    /// Reads page `i` (faulting it in through the handler).
    fn page(&self, i: usize) -> Vec<u8> {
        assert!(i * PAGE < self.len);
        // SAFETY: the page is inside the mapping; reading it blocks until
        // the handler has filled it.
        unsafe { std::slice::from_raw_parts(self.ptr.add(i * PAGE), PAGE) }.to_vec()
    }

    /// Gives pages `[first, first + n)` back, as a balloon does.
    fn remove(&self, first: usize, n: usize) {
        assert!((first + n) * PAGE <= self.len);
        // SAFETY: the range is inside the mapping and nothing refers to it.
        let rc = unsafe {
            libc::madvise(
                self.ptr.add(first * PAGE).cast(),
                n * PAGE,
                libc::MADV_DONTNEED,
            )
        };
        assert_eq!(rc, 0);
    }

    fn mapping(&self, offset: usize) -> GuestRegionUffdMapping {
        GuestRegionUffdMapping {
            base_host_virt_addr: self.ptr as u64,
            size: self.len,
            offset: offset as u64,
            page_size: PAGE,
        }
    }
}

impl Drop for Anon {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Guest RAM as two regions, registered, plus the handshake describing it.
struct Guest {
    a: Anon,
    b: Anon,
}

impl Guest {
    fn new(uffd: &Uffd) -> Self {
        let guest = Self {
            a: Anon::new(PAGES_A),
            b: Anon::new(PAGES_B),
        };
        guest.a.register(uffd);
        guest.b.register(uffd);
        guest
    }

    fn regions(&self) -> [GuestRegionUffdMapping; 2] {
        [self.a.mapping(0), self.b.mapping(PAGES_A * PAGE)]
    }

    /// Reads every page and compares it with the memory file.
    fn check_all(&self, expected: &[u8]) {
        for i in 0..PAGES {
            let got = if i < PAGES_A {
                self.a.page(i)
            } else {
                self.b.page(i - PAGES_A)
            };
            assert!(
                got == expected[i * PAGE..(i + 1) * PAGE],
                "page {i} differs from the memory file"
            );
        }
    }
}

/// Aborts the test process if the guard lives longer than `limit`: a
/// handler that died leaves the reading thread blocked in a fault forever.
fn watchdog(limit: Duration) -> mpsc::Sender<()> {
    let (tx, rx) = mpsc::channel::<()>();
    thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            eprintln!("watchdog: the handler did not serve the faults in {limit:?}");
            std::process::abort();
        }
    });
    tx
}

/// Runs the library's handler side in a thread on `listener`.
fn spawn_library_handler(
    listener: UnixListener,
    mem: PathBuf,
) -> thread::JoinHandle<Result<ServeStats, Error>> {
    thread::spawn(move || {
        let result = (|| {
            let memory = MemoryFile::open(&mem)?;
            let (vmm, _) = listener.accept().map_err(Error::Receive)?;
            let hs = receive_handshake(&vmm, Some(Duration::from_secs(10)))?;
            serve(&hs.uffd, &hs.regions, &memory, &vmm)
        })();
        if let Err(e) = &result {
            eprintln!("handler: {}", error_chain(e));
        }
        result
    })
}

fn spawn_binary(socket: &Path, mem: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_ember-uffd-handler"))
        .arg(socket)
        .arg(mem)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn connect(socket: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match UnixStream::connect(socket) {
            Ok(s) => return s,
            Err(e) if Instant::now() > deadline => panic!("cannot connect to the handler: {e}"),
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Waits for the child; returns its exit code and stderr.
fn finish(mut child: Child) -> (Option<i32>, String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the handler did not exit");
        }
        thread::sleep(Duration::from_millis(10));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status.code(), stderr)
}

fn holes_and_zeros() -> u64 {
    (0..PAGES)
        .filter(|&i| page_bytes(i).is_none_or(|p| p.iter().all(|&b| b == 0)))
        .count() as u64
}

#[test]
fn serve_every_page_matches_the_memory_file_and_hangup_ends_it() {
    let Some(uffd) = vmm_uffd() else { return };
    let dir = TempDir::new().unwrap();
    let (mem, expected) = memory_file(dir.as_path());
    let socket = dir.as_path().join("uffd.sock");
    let handler = spawn_library_handler(UnixListener::bind(&socket).unwrap(), mem);

    let guard = watchdog(Duration::from_secs(60));
    let guest = Guest::new(&uffd);
    let vmm = UnixStream::connect(&socket).unwrap();
    send_handshake(&vmm, &guest.regions(), uffd.as_raw_fd()).unwrap();
    guest.check_all(&expected);
    drop(vmm);
    let stats = handler.join().unwrap().unwrap();
    drop(guard);
    eprintln!("{stats:?}");

    assert_eq!(stats.faults(), PAGES as u64, "{stats:?}");
    // Holes are served as zero pages; explicit zero pages are copied
    // (unless the filesystem reports them as holes too).
    let holes = (0..PAGES).filter(|&i| page_bytes(i).is_none()).count() as u64;
    assert!(stats.zero_pages >= holes.min(1), "{stats:?}");
    assert!(stats.zero_pages <= holes_and_zeros(), "{stats:?}");
}

#[test]
fn serve_removed_pages_come_back_zeroed() {
    let Some(uffd) = vmm_uffd() else { return };
    let dir = TempDir::new().unwrap();
    let (mem, expected) = memory_file(dir.as_path());
    let socket = dir.as_path().join("uffd.sock");
    let handler = spawn_library_handler(UnixListener::bind(&socket).unwrap(), mem);

    let guard = watchdog(Duration::from_secs(60));
    let guest = Guest::new(&uffd);
    let vmm = UnixStream::connect(&socket).unwrap();
    send_handshake(&vmm, &guest.regions(), uffd.as_raw_fd()).unwrap();
    guest.check_all(&expected);
    // Pages 0 and 1 hold the pattern; the balloon takes them, the guest
    // touches them again: zeros, not the snapshot's contents.
    assert!(guest.a.page(0).iter().any(|&b| b != 0));
    guest.a.remove(0, 2);
    assert!(guest.a.page(0).iter().all(|&b| b == 0));
    assert!(guest.a.page(1).iter().all(|&b| b == 0));
    assert!(guest.a.page(4) == expected[4 * PAGE..5 * PAGE]);
    drop(vmm);
    let stats = handler.join().unwrap().unwrap();
    drop(guard);
    eprintln!("{stats:?}");

    assert_eq!(stats.remove_events, 1, "{stats:?}");
    assert_eq!(stats.faults(), PAGES as u64 + 2, "{stats:?}");
}

#[test]
fn serve_concurrent_faults_on_the_same_pages_are_all_resolved() {
    let Some(uffd) = vmm_uffd() else { return };
    let dir = TempDir::new().unwrap();
    let (mem, expected) = memory_file(dir.as_path());
    let socket = dir.as_path().join("uffd.sock");
    let handler = spawn_library_handler(UnixListener::bind(&socket).unwrap(), mem);

    let guard = watchdog(Duration::from_secs(60));
    let guest = Guest::new(&uffd);
    let vmm = UnixStream::connect(&socket).unwrap();
    send_handshake(&vmm, &guest.regions(), uffd.as_raw_fd()).unwrap();
    // Four "vCPUs" read region A at once, each from a different start.
    let (base, len) = (guest.a.ptr as usize, guest.a.len);
    let readers: Vec<_> = (0..4)
        .map(|t| {
            thread::spawn(move || {
                (0..PAGES_A)
                    .map(|k| (k + t * 3) % PAGES_A)
                    .map(|i| {
                        assert!((i + 1) * PAGE <= len);
                        // SAFETY: inside region A, which outlives the readers
                        // (they are joined below).
                        let page = unsafe {
                            std::slice::from_raw_parts((base + i * PAGE) as *const u8, PAGE)
                        };
                        (i, page.to_vec())
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for r in readers {
        for (i, page) in r.join().unwrap() {
            assert!(page == expected[i * PAGE..(i + 1) * PAGE], "page {i}");
        }
    }
    drop(vmm);
    let stats = handler.join().unwrap().unwrap();
    drop(guard);
    eprintln!("{stats:?}");

    assert_eq!(stats.faults(), PAGES_A as u64, "{stats:?}");
}

#[test]
fn binary_serves_every_page_and_exits_zero_when_the_vmm_hangs_up() {
    let Some(uffd) = vmm_uffd() else { return };
    let dir = TempDir::new().unwrap();
    let (mem, expected) = memory_file(dir.as_path());
    let socket = dir.as_path().join("uffd.sock");
    let child = spawn_binary(&socket, &mem);

    let guard = watchdog(Duration::from_secs(60));
    let guest = Guest::new(&uffd);
    let vmm = connect(&socket);
    send_handshake(&vmm, &guest.regions(), uffd.as_raw_fd()).unwrap();
    guest.check_all(&expected);
    drop(vmm);
    let (code, stderr) = finish(child);
    drop(guard);
    eprintln!("{stderr}");

    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("2 regions (98304 bytes) received"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{PAGES} faults served")),
        "{stderr}"
    );
    // The handler took its socket down once the VMM was connected.
    assert!(!socket.exists());
}

#[test]
fn binary_refuses_a_malformed_handshake_with_a_clear_error() {
    let dir = TempDir::new().unwrap();
    let (mem, _) = memory_file(dir.as_path());
    let socket = dir.as_path().join("uffd.sock");
    let child = spawn_binary(&socket, &mem);

    let mut vmm = connect(&socket);
    vmm.write_all(br#"[{"base_host_virt_addr": 4096, "size": "big"}]"#)
        .unwrap();
    let (code, stderr) = finish(child);

    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "ember-uffd-handler: error: the handshake is not a JSON list of guest region mappings: "
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn binary_refuses_a_missing_memory_file_before_listening() {
    let dir = TempDir::new().unwrap();
    let socket = dir.as_path().join("uffd.sock");
    let child = spawn_binary(&socket, &dir.as_path().join("nope"));
    let (code, stderr) = finish(child);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("error: memory file "), "{stderr}");
    assert!(!socket.exists());
}

#[test]
fn serve_region_past_the_end_of_the_memory_file_is_refused() {
    let Some(uffd) = vmm_uffd() else { return };
    let dir = TempDir::new().unwrap();
    let (mem, _) = memory_file(dir.as_path());
    let memory = MemoryFile::open(&mem).unwrap();
    let guest = Guest::new(&uffd);
    let mut regions = guest.regions();
    regions[1].offset += PAGE as u64;
    let (_vmm, handler_end) = UnixStream::pair().unwrap();
    let err = serve(&uffd, &regions, &memory, &handler_end).unwrap_err();
    assert!(
        matches!(err, Error::RegionBeyondFile { index: 1, .. }),
        "{err}"
    );
}
