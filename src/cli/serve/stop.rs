//! Stop sequences over text that arrives in pieces.
//!
//! The output ends just before the first stop sequence. Text that could be
//! the start of one is held back until the next piece says whether it is,
//! so a stop sequence split across two blocks is still found and no piece
//! of it is ever sent.

pub struct StopFilter {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopFilter {
    pub fn new(stops: Vec<String>) -> StopFilter {
        StopFilter {
            stops,
            held: String::new(),
            stopped: false,
        }
    }

    /// Whether a stop sequence ended the output.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Takes the next piece of text; returns what can be released now.
    pub fn feed(&mut self, piece: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.held.push_str(piece);
        let first_stop = self
            .stops
            .iter()
            .filter_map(|stop| self.held.find(stop.as_str()))
            .min();
        if let Some(at) = first_stop {
            self.stopped = true;
            self.held.truncate(at);
            return std::mem::take(&mut self.held);
        }
        let keep = self.longest_partial_stop();
        self.held.drain(..self.held.len() - keep).collect()
    }

    /// The text still held back, once no more is coming.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length of the longest end of the held text that begins a stop sequence.
    fn longest_partial_stop(&self) -> usize {
        self.held
            .char_indices()
            .map(|(at, _)| &self.held[at..])
            .find(|tail| self.stops.iter().any(|stop| stop.starts_with(tail)))
            .map_or(0, str::len)
    }
}

#[cfg(test)]
mod tests {
    use super::StopFilter;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut filter = StopFilter::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out: String = pieces.iter().map(|p| filter.feed(p)).collect();
        out.push_str(&filter.finish());
        (out, filter.stopped())
    }

    #[test]
    fn ends_before_the_first_stop_even_across_pieces() {
        assert_eq!(run(&["\n\n"], &["ab\n", "\ncd"]), ("ab".into(), true));
        assert_eq!(run(&["x", "bc"], &["abcx"]), ("a".into(), true));
        assert_eq!(run(&["END"], &["aEN", "D", "more"]), ("a".into(), true));
    }

    #[test]
    fn releases_everything_without_a_stop() {
        assert_eq!(run(&[], &["ab", "c"]), ("abc".into(), false));
        assert_eq!(run(&["END"], &["aEN", "d"]), ("aENd".into(), false));
        assert_eq!(run(&["EN"], &["aé", "E"]), ("aéE".into(), false));
    }
}
