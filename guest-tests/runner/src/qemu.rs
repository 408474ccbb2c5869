//! Running one guest in its own QEMU under the hypervisor firmware, with a timeout, capturing
//! the guest console.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::protocol::Exit;

/// Everything one QEMU run needs.
#[derive(Clone, Debug)]
pub struct Launch {
    /// The QEMU binary.
    pub qemu: PathBuf,
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
    /// The hypervisor configuration string (`opt/stagehand/config`).
    pub config: String,
    /// File that receives the second UART (the hypervisor's log); `None` gives the machine one
    /// UART, which the hypervisor then shares with the guest.
    pub hypervisor_log: Option<PathBuf>,
    /// Extra arguments appended as they are.
    pub extra_args: Vec<String>,
    /// How long QEMU may run.
    pub timeout: Duration,
}

/// What a run produced.
#[derive(Debug)]
pub struct Outcome {
    /// The guest console (first UART), as text.
    pub console: String,
    /// QEMU's own standard error.
    pub stderr: String,
    /// How QEMU ended.
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
            "virt,virtualization=on,gic-version=3,iommu=smmuv3".into(),
            "-cpu".into(),
            "max".into(),
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
        args.extend([
            "-fw_cfg".into(),
            format!(
                "name=opt/stagehand/config,string={}",
                qemu_escape(&self.config)
            ),
            "-semihosting-config".into(),
            "enable=on,target=native".into(),
        ]);
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
                    stderr: String::new(),
                    exit: Exit::NotStarted(format!("{}: {error}", self.qemu.display())),
                }
            }
        };
        let stdout = reader(child.stdout.take());
        let stderr = reader(child.stderr.take());
        let exit = wait_with_timeout(&mut child, self.timeout);
        Outcome {
            console: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
            exit,
        }
    }
}

fn path_arg(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// Reads a pipe to its end on a thread of its own (so a full pipe never stalls QEMU).
fn reader(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Exit {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Exit::Exited(status.code()),
            Ok(None) if start.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Exit::TimedOut(timeout.as_secs());
            }
            Ok(None) => thread::sleep(Duration::from_millis(50)),
            Err(error) => {
                let _ = child.kill();
                let _ = child.wait();
                return Exit::NotStarted(format!("waiting for QEMU: {error}"));
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
            firmware: "build/stagehand.bin".into(),
            kernel: Some("build/guests/dt.elf".into()),
            initrd: Some("logs/dt.initrd".into()),
            append: Some("a b".into()),
            cpus: 2,
            memory: "512M".into(),
            config: "exit=semihosting,ram=256M".into(),
            hypervisor_log: Some("logs/dt.hyp.log".into()),
            extra_args: vec![],
            timeout: Duration::from_secs(5),
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
        assert!(args
            .contains(&"name=opt/stagehand/config,string=exit=semihosting,,ram=256M".to_string()));
        assert!(joined.contains("-semihosting-config enable=on,target=native"));
        assert!(joined.ends_with("-initrd logs/dt.initrd -append a b"));
        assert!(args.contains(&"-no-reboot".to_string()));
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
        assert_eq!(exit, Exit::TimedOut(0));
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
            Exit::Exited(Some(3))
        );
    }
}
