//! What the kernel says processes and the machine used: CPU time and resident memory, from `/proc`.

use std::time::Duration;

use anyhow::Context;

/// The whole machine's CPU time since boot, all CPUs together.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MachineCpu {
    /// Running anything: user, nice, system, irq and softirq time.
    pub busy: Duration,
    /// Taken by the hypervisor (`steal`).
    pub stolen: Duration,
}

impl MachineCpu {
    /// Read from `/proc/stat` (none elsewhere).
    pub fn now() -> Option<MachineCpu> {
        MachineCpu::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// `cpu  user nice system idle iowait irq softirq steal …`, in ticks.
    fn parse(stat: &str) -> Option<MachineCpu> {
        let mut fields = stat.lines().next()?.split_whitespace();
        fields.next().filter(|f| *f == "cpu")?;
        let ticks: Vec<u64> = fields.take(8).map(str::parse).collect::<Result<_, _>>().ok()?;
        let &[user, nice, system, _idle, _iowait, irq, softirq, steal] = ticks.as_slice() else { return None };
        Some(MachineCpu { busy: from_ticks(user + nice + system + irq + softirq), stolen: from_ticks(steal) })
    }

    pub fn plus(self, more: MachineCpu) -> MachineCpu {
        MachineCpu { busy: self.busy + more.busy, stolen: self.stolen + more.stolen }
    }

    /// How much it has grown since `before`.
    pub fn since(self, before: MachineCpu) -> MachineCpu {
        MachineCpu { busy: self.busy.saturating_sub(before.busy), stolen: self.stolen.saturating_sub(before.stolen) }
    }
}

/// `/proc`'s CPU times are in ticks of USER_HZ: 100 per second on Linux.
fn from_ticks(ticks: u64) -> Duration {
    Duration::from_millis(ticks * 10)
}

/// CPU time process `pid` has used, user and system together: `utime` and `stime` in `/proc/PID/stat` (none
/// elsewhere).
pub fn cpu_of(pid: u32) -> Option<Duration> {
    cpu_in(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// `pid (comm) state ppid … utime stime …`: the 14th and 15th fields, in ticks. `comm` may hold spaces and
/// parentheses, so the fields are counted from its last closing one.
fn cpu_in(stat: &str) -> Option<Duration> {
    let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(from_ticks(user + system))
}

/// The resident set of process `pid`, in MiB.
pub fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS in /proc/PID/status")?;
    Ok(kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{cpu_in, MachineCpu};

    #[test]
    fn the_machine_is_busy_outside_idle_iowait_and_steal_which_is_the_eighth_number() {
        let stat = "cpu  267577 16968 64292 223355 3460 10 16377 3877 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n";
        let busy = Duration::from_millis((267_577 + 16_968 + 64_292 + 10 + 16_377) * 10);
        assert_eq!(MachineCpu::parse(stat), Some(MachineCpu { busy, stolen: Duration::from_millis(38_770) }));
        assert_eq!(MachineCpu::parse("cpu  1 2 3\n"), None, "a kernel too old to count steal");
        assert_eq!(MachineCpu::parse("intr 1 2 3 4 5 6 7 8 9\n"), None);
    }

    #[test]
    fn a_process_cpu_time_is_its_user_and_system_time_in_hundredths_of_a_second() {
        // The fields after `comm`: state, ppid, pgrp, session, tty, tpgid, flags, minflt, cminflt, majflt, cmajflt,
        // then utime and stime.
        let stat = "4242 (tokio-rt) (x) y) S 1 4242 4242 0 -1 4194560 2310 0 0 0 731 269 0 0 20 0 2 0 1234 ...";
        assert_eq!(cpu_in(stat), Some(Duration::from_millis(10_000)));
        assert_eq!(cpu_in("4242 (tollgate) S 1 2 3"), None, "cut short");
        assert_eq!(cpu_in("no parenthesis 1 2 3 4 5 6 7 8 9 10 11 12 13 14"), None);
    }
}
