//! Running one guest in its own QEMU under the hypervisor firmware, with a timeout, capturing
//! the guest console and the hypervisor's exit status line.
//!
//! QEMU never gets `-semihosting-config`: semihosting cannot be kept from the guest (`HLT`
//! does not trap to EL2), and would let it run host commands. The hypervisor reports its exit
//! status as a line on its UART instead ([`stagehand_abi::exit_status`]).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Sender;
use std::thread;
use std::time::{Duration, Instant};

use crate::protocol::Exit;

/// A GIC version of the `virt` board.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gic {
    /// GICv2 (GIC-400 style), what `-M virt,virtualization=on` gives when it names none.
    V2,
    /// GICv3, `gic-version=3`.
    V3,
}

/// The board a guest runs on: `virt` with EL2, a CPU model, a GIC and an SMMU or none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Machine {
    /// `-cpu` (a QEMU CPU model with EL2).
    pub cpu: &'static str,
    /// The GIC version.
    pub gic: Gic,
    /// Whether the board has an SMMUv3 (`iommu=smmuv3`).
    pub smmu: bool,
}

impl Machine {
    /// The board every suite ran on before there was a choice: `-cpu max`, GICv3, SMMUv3.
    pub const DEFAULT: Machine = Machine {
        cpu: "max",
        gic: Gic::V3,
        smmu: true,
    };

    /// The `-M` value. A GICv2 board names no `gic-version` (QEMU's default is 2), so the
    /// board without an SMMU is exactly the plain `virt,virtualization=on` people start with.
    pub fn qemu_machine(&self) -> String {
        let mut machine = String::from("virt,virtualization=on");
        if self.gic == Gic::V3 {
            machine.push_str(",gic-version=3");
        }
        if self.smmu {
            machine.push_str(",iommu=smmuv3");
        }
        machine
    }

    /// A short description for the runner's progress lines, e.g. `cortex-a53, GICv2, no SMMU`.
    pub fn describe(&self) -> String {
        let gic = match self.gic {
            Gic::V2 => "GICv2",
            Gic::V3 => "GICv3",
        };
        let smmu = if self.smmu { "SMMUv3" } else { "no SMMU" };
        format!("{}, {gic}, {smmu}", self.cpu)
    }
}

/// Everything one QEMU run needs.
#[derive(Clone, Debug)]
pub struct Launch {
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// The board (`-M`, `-cpu`).
    pub machine: Machine,
    /// The hypervisor firmware (`-bios`).
    pub firmware: PathBuf,
    /// The guest image (`-kernel`); `None` starts QEMU without one.
    pub kernel: Option<PathBuf>,
    /// `-initrd`, if any.
    pub initrd: Option<PathBuf>,
    /// `-append`, if any.
    pub append: Option<String>,
    /// `-smp`.
    pub cpus: u32,
    /// `-m`.
    pub memory: String,
    /// The hypervisor configuration string (`opt/stagehand/config`; empty: no such file).
    pub config: String,
    /// File that receives the second UART (the hypervisor's log); `None` gives the machine one
    /// UART, which the hypervisor then shares with the guest.
    pub hypervisor_log: Option<PathBuf>,
    /// Extra arguments appended as they are.
    pub extra_args: Vec<String>,
    /// How long QEMU may run.
    pub timeout: Duration,
    /// Receives a copy of the console as it arrives, for a host-side peer that must act while
    /// the guest runs (the sender is dropped when QEMU's output ends).
    pub console_tap: Option<Sender<Vec<u8>>>,
}

/// What a run produced.
#[derive(Debug)]
pub struct Outcome {
    /// The guest console (first UART), as text.
    pub console: String,
    /// The hypervisor's UART, as text: its log file, or the console when the UART is shared.
    pub hypervisor_uart: String,
    /// QEMU's own standard error.
    pub stderr: String,
    /// How the run ended, the hypervisor's exit status line included.
    pub exit: Exit,
}

/// Escapes a value for QEMU's option syntax, where a comma ends the value unless doubled.
pub fn qemu_escape(value: &str) -> String {
    value.replace(',', ",,")
}

impl Launch {
    /// The QEMU command line (arguments after the binary).
    pub fn arguments(&self) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "-M".into(),
            self.machine.qemu_machine(),
            "-cpu".into(),
            self.machine.cpu.into(),
            "-m".into(),
            self.memory.clone(),
            "-smp".into(),
            self.cpus.to_string(),
            "-display".into(),
            "none".into(),
            "-monitor".into(),
            "none".into(),
            "-nic".into(),
            "none".into(),
            "-no-reboot".into(),
            "-bios".into(),
            path_arg(&self.firmware),
        ];
        if let Some(kernel) = &self.kernel {
            args.extend(["-kernel".into(), path_arg(kernel)]);
        }
        args.extend(["-serial".into(), "stdio".into()]);
        if let Some(log) = &self.hypervisor_log {
            args.extend(["-serial".into(), format!("file:{}", path_arg(log))]);
        }
        // QEMU refuses an empty `string=`; no configuration file gives the defaults.
        if !self.config.is_empty() {
            args.extend([
                "-fw_cfg".into(),
                format!(
                    "name=opt/stagehand/config,string={}",
                    qemu_escape(&self.config)
                ),
            ]);
        }
        if let Some(initrd) = &self.initrd {
            args.extend(["-initrd".into(), path_arg(initrd)]);
        }
        if let Some(append) = &self.append {
            args.extend(["-append".into(), append.clone()]);
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }

    /// Runs QEMU to completion or until the timeout, when it is killed.
    pub fn run(&self) -> Outcome {
        if let Some(path) = &self.hypervisor_log {
            // The exit status is read from this file: no line of an earlier run may count.
            let _ = std::fs::remove_file(path);
        }
        let mut command = Command::new(&self.qemu);
        command
            .args(self.arguments())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(error) => {
                return Outcome {
                    console: String::new(),
                    hypervisor_uart: String::new(),
                    stderr: String::new(),
                    exit: Exit::NotStarted(format!("{}: {error}", self.qemu.display())),
                }
            }
        };
        let stdout = reader(child.stdout.take(), self.console_tap.clone());
        let stderr = reader(child.stderr.take(), None);
        let ended = wait_with_timeout(&mut child, self.timeout);
        let console = stdout.join().unwrap_or_default();
        let hypervisor_uart = match &self.hypervisor_log {
            Some(path) => std::fs::read(path)
                .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                .unwrap_or_default(),
            None => console.clone(),
        };
        let exit = match ended {
            Ok(process_status) => Exit::of_run(process_status, &hypervisor_uart),
            Err(exit) => exit,
        };
        Outcome {
            console,
            hypervisor_uart,
            stderr: stderr.join().unwrap_or_default(),
            exit,
        }
    }
}

fn path_arg(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// Reads a pipe to its end on a thread of its own (so a full pipe never stalls QEMU), copying
/// each chunk to `tap` if there is one.
fn reader(
    pipe: Option<impl Read + Send + 'static>,
    tap: Option<Sender<Vec<u8>>>,
) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let mut chunk = [0u8; 4096];
            loop {
                match pipe.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => {
                        bytes.extend_from_slice(&chunk[..n]);
                        if let Some(tap) = &tap {
                            // A peer that stopped listening is no reason to stop reading.
                            let _ = tap.send(chunk[..n].to_vec());
                        }
                    }
                    Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Waits for the process to exit by itself (`Ok` with its status, `None` when killed by a
/// signal) or kills it at the timeout.
///
/// # Errors
/// [`Exit::TimedOut`], or [`Exit::NotStarted`] when it cannot be waited for.
fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Result<Option<i32>, Exit> {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status.code()),
            Ok(None) if start.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Exit::TimedOut(timeout.as_secs()));
            }
            Ok(None) => thread::sleep(Duration::from_millis(50)),
            Err(error) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Exit::NotStarted(format!("waiting for QEMU: {error}")));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch() -> Launch {
        Launch {
            qemu: "qemu-system-aarch64".into(),
            machine: Machine::DEFAULT,
            firmware: "build/stagehand.bin".into(),
            kernel: Some("build/guests/dt.elf".into()),
            initrd: Some("logs/dt.initrd".into()),
            append: Some("a b".into()),
            cpus: 2,
            memory: "512M".into(),
            config: "log=debug,ram=256M".into(),
            hypervisor_log: Some("logs/dt.hyp.log".into()),
            extra_args: vec![],
            timeout: Duration::from_secs(5),
            console_tap: None,
        }
    }

    #[test]
    fn command_line_has_the_fixed_machine_and_the_suite_settings() {
        let args = launch().arguments();
        let joined = args.join(" ");
        assert!(joined.starts_with(
            "-M virt,virtualization=on,gic-version=3,iommu=smmuv3 -cpu max -m 512M -smp 2"
        ));
        assert!(
            joined.contains("-bios build/stagehand.bin -kernel build/guests/dt.elf -serial stdio")
        );
        assert!(joined.contains("-serial file:logs/dt.hyp.log"));
        assert!(args.contains(&"name=opt/stagehand/config,string=log=debug,,ram=256M".to_string()));
        assert!(!joined.contains("semihosting"));
        assert!(joined.ends_with("-initrd logs/dt.initrd -append a b"));
        assert!(args.contains(&"-no-reboot".to_string()));
    }

    #[test]
    fn the_machine_is_the_launchs_own() {
        let mut launch = launch();
        launch.machine = Machine {
            cpu: "cortex-a53",
            gic: Gic::V2,
            smmu: false,
        };
        assert!(launch
            .arguments()
            .join(" ")
            .starts_with("-M virt,virtualization=on -cpu cortex-a53 -m 512M"));
        launch.machine.smmu = true;
        assert_eq!(
            launch.machine.qemu_machine(),
            "virt,virtualization=on,iommu=smmuv3"
        );
        assert_eq!(launch.machine.describe(), "cortex-a53, GICv2, SMMUv3");
        launch.machine.gic = Gic::V3;
        launch.machine.smmu = false;
        assert_eq!(
            launch.machine.qemu_machine(),
            "virt,virtualization=on,gic-version=3"
        );
    }

    #[test]
    fn kernel_and_second_uart_are_optional() {
        let mut launch = launch();
        launch.kernel = None;
        launch.hypervisor_log = None;
        let args = launch.arguments();
        assert!(!args.contains(&"-kernel".to_string()));
        assert_eq!(args.iter().filter(|a| *a == "-serial").count(), 1);
        assert!(args
            .join(" ")
            .contains("-bios build/stagehand.bin -serial stdio -fw_cfg"));
        launch.config = String::new();
        assert!(!launch.arguments().contains(&"-fw_cfg".to_string()));
    }

    /// Writes an executable shell script with `body` at `path` and returns the path.
    fn script(path: &Path, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path.to_path_buf()
    }

    #[test]
    fn the_exit_comes_from_the_hypervisors_status_line() {
        // A stand-in for QEMU that writes a status line into the second UART's file, as the
        // hypervisor does, then exits 0 as QEMU does after PSCI SYSTEM_OFF.
        let dir = std::env::temp_dir().join(format!("guest-runner-qemu-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fake = script(
            &dir.join("fake-qemu"),
            "for arg; do case $arg in file:*) printf 'x\\r\\nstagehand: exit status 3\\r\\n' \
             >\"${arg#file:}\";; esac; done\necho console",
        );
        let mut launch = launch();
        launch.qemu = fake;
        launch.hypervisor_log = Some(dir.join("hyp.log"));
        let outcome = launch.run();
        assert_eq!(outcome.exit, Exit::Status(3));
        assert_eq!(outcome.console, "console\n");
        assert!(outcome
            .hypervisor_uart
            .ends_with("stagehand: exit status 3\r\n"));
        // A line left by an earlier run never counts: the file is removed first.
        launch.qemu = "true".into();
        assert_eq!(launch.run().exit, Exit::NoStatusLine);
        // With a shared UART the console holds the line.
        launch.hypervisor_log = None;
        launch.qemu = script(
            &dir.join("fake-qemu-shared"),
            "echo 'stagehand: exit status 2'",
        );
        assert_eq!(launch.run().exit, Exit::Status(2));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_qemu_is_reported() {
        let mut launch = launch();
        launch.qemu = "/nonexistent/qemu".into();
        assert!(matches!(launch.run().exit, Exit::NotStarted(_)));
    }

    #[test]
    fn a_slow_process_is_killed_at_the_timeout() {
        let mut child = Command::new("sleep").arg("30").spawn().expect("sleep runs");
        let start = Instant::now();
        let exit = wait_with_timeout(&mut child, Duration::from_millis(200));
        assert_eq!(exit, Err(Exit::TimedOut(0)));
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn an_exit_status_is_reported() {
        let mut child = Command::new("sh")
            .args(["-c", "exit 3"])
            .spawn()
            .expect("sh runs");
        assert_eq!(
            wait_with_timeout(&mut child, Duration::from_secs(10)),
            Ok(Some(3))
        );
    }
}
