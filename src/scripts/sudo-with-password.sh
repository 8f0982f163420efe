# clan: runs `sudo -- "$@"` with the password from the first line of standard input, given
# to sudo only (SUDO_ASKPASS=printenv: sudo runs it with the prompt, the variable's name, as
# its argument). The rest of the input reaches the command; the password line never does,
# also when a NOPASSWD rule means sudo does not ask. -k: a cached earlier success does not
# count, so a wrong password is always found.
IFS= read -r CLAN_SUDO_PASSWORD || exit 1
export CLAN_SUDO_PASSWORD
SUDO_ASKPASS=$(command -v printenv) || exit 1
export SUDO_ASKPASS
exec sudo -k -A -p CLAN_SUDO_PASSWORD -- "$@"
