"""Where a config runs; every target answers the one interface in `base`.

`shell` reaches a host (paramiko, with a sudo or nsenter prefix), `smtpd` drives a real OpenSMTPD
over any shell, `lab` builds test hosts here, `sandbox` a private smtpd on an existing host, and
`select` turns a `--target` spec into one of them. Import the submodule you need: importing this
package loads no SSH or TLS library.
"""

# Seconds an SSH host gets for its banner and login (shell.py); here, so that the command line
# can offer it as a default without loading the SSH stack.
CONNECT_TIMEOUT = 10.0
