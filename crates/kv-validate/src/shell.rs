//! Command lines printed for people to paste: every word quoted where a
//! POSIX shell would read a character of it as syntax (a `-layer-bits` rule
//! holds `;`, which would end the command and drop the rules after it).

/// `word` as a POSIX shell reads it back: as it is when every character is
/// inert, else in single quotes (a `'` inside as `'\''`).
pub fn quote(word: &str) -> String {
    let inert = |c: char| c.is_ascii_alphanumeric() || "-_.,:=/+@%".contains(c);
    if !word.is_empty() && word.chars().all(inert) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

/// The whitespace-separated words of `flags`, each [`quote`]d.
pub fn quote_words(flags: &str) -> String {
    flags
        .split_whitespace()
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sh` itself is the reference: the quoted words come back as they were.
    #[test]
    fn quoted_words_read_back_word_for_word_in_a_shell() {
        let flags = "-bits 2 -layer-bits k:8,18=3;v:3=4 it's $HOME`x` a|b&c>d *";
        let quoted = quote_words(flags);
        assert!(quoted.contains("'k:8,18=3;v:3=4'"), "{quoted}");
        assert!(quoted.starts_with("-bits 2 -layer-bits"), "{quoted}");
        let output = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf '%s\\n' {quoted}"))
            .output()
            .unwrap();
        let words: Vec<&str> = flags.split_whitespace().collect();
        assert_eq!(
            String::from_utf8(output.stdout).unwrap(),
            words.join("\n") + "\n"
        );
        assert_eq!(quote(""), "''");
    }
}
