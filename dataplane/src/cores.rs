//! Which cores the workers are pinned to: `--cores`, written as the kernel writes CPU lists
//! (`2,3`, `2-5`, `0,4-7`), so an operator can give the workers the cores isolated with
//! `isolcpus=`/`nohz_full=` and keep everything else off them.

/// A CPU list that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CoreListError(String);

/// The most cores one list may name: a guard against `0-4294967295`.
const MAX_CORES: usize = 4096;

/// Parses a kernel-style CPU list into core ids, in the order written, each once.
///
/// # Errors
///
/// An empty list, an entry that is not a number or a `FIRST-LAST` range with
/// `FIRST <= LAST`, a core named twice, or more than 4096 cores.
pub fn parse_core_list(s: &str) -> Result<Vec<usize>, CoreListError> {
    let err = |why: String| Err(CoreListError(format!("--cores {s:?}: {why}")));
    let num = |p: &str| {
        p.trim()
            .parse::<usize>()
            .map_err(|_| CoreListError(format!("--cores {s:?}: {p:?} is not a core number")))
    };
    let mut cores = Vec::new();
    for part in s.split(',') {
        if part.trim().is_empty() {
            return err("an empty entry (write e.g. 2,3 or 2-5)".into());
        }
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => {
                let c = num(part)?;
                (c, c)
            }
        };
        if first > last {
            return err(format!("{part:?}: need FIRST <= LAST"));
        }
        if last - first >= MAX_CORES || cores.len() + (last - first) >= MAX_CORES {
            return err(format!("more than {MAX_CORES} cores"));
        }
        for c in first..=last {
            if cores.contains(&c) {
                return err(format!("core {c} named twice"));
            }
            cores.push(c);
        }
    }
    Ok(cores)
}

/// The core for each of `workers` workers: worker i on the i-th of `wanted` (which must
/// name at least one core per worker, each one this process may run on), or, without a
/// list, on the i-th core of `available` modulo their count.
///
/// # Errors
///
/// Fewer listed cores than workers, or a listed core outside `available` (the process's
/// affinity mask: offline, nonexistent, or excluded by `taskset`/the container's cpuset).
pub fn assign(
    workers: usize,
    wanted: Option<&[usize]>,
    available: &[usize],
) -> Result<Vec<Option<usize>>, CoreListError> {
    match wanted {
        None => Ok((0..workers)
            .map(|w| available.get(w % available.len().max(1)).copied())
            .collect()),
        Some(list) => {
            if list.len() < workers {
                return Err(CoreListError(format!(
                    "--cores gives {} core(s) for {workers} workers: name one per worker",
                    list.len()
                )));
            }
            if let Some(c) = list.iter().find(|c| !available.contains(c)) {
                return Err(CoreListError(format!(
                    "--cores: core {c} is not one this process may run on (allowed: {available:?})"
                )));
            }
            Ok(list[..workers].iter().map(|c| Some(*c)).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_as_the_kernel_writes_them() {
        assert_eq!(parse_core_list("3").unwrap(), vec![3]);
        assert_eq!(parse_core_list("2,3").unwrap(), vec![2, 3]);
        assert_eq!(parse_core_list("0,4-6").unwrap(), vec![0, 4, 5, 6]);
        assert_eq!(parse_core_list(" 5 - 6 ,1").unwrap(), vec![5, 6, 1]);
    }

    #[test]
    fn bad_lists_say_why() {
        for (bad, why) in [
            ("", "empty entry"),
            ("1,,2", "empty entry"),
            ("a", "not a core number"),
            ("3-1", "FIRST <= LAST"),
            ("1,0-2", "named twice"),
            ("0-99999", "more than 4096"),
            ("-1", "not a core number"),
        ] {
            let e = parse_core_list(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn workers_get_listed_cores_or_wrap_around_available_ones() {
        assert_eq!(
            assign(3, None, &[0, 1]).unwrap(),
            vec![Some(0), Some(1), Some(0)]
        );
        assert_eq!(assign(1, None, &[]).unwrap(), vec![None]);
        assert_eq!(
            assign(2, Some(&[3, 1, 2]), &[0, 1, 2, 3]).unwrap(),
            vec![Some(3), Some(1)]
        );
        let e = assign(2, Some(&[1]), &[0, 1]).unwrap_err().to_string();
        assert!(e.contains("one per worker"), "{e}");
        let e = assign(1, Some(&[7]), &[0, 1]).unwrap_err().to_string();
        assert!(e.contains("core 7"), "{e}");
    }
}
