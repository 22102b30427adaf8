<?php
// The PHP client against a real `flute-token-broker serve --dev` on a Unix
// socket (run by .ci/run; needs php-cli and php-curl). Exits non-zero on
// the first failed check.

declare(strict_types=1);

require __DIR__ . '/FluteBroker.php';

$bin = getenv('FLUTE_BROKER_BIN') ?: exit("FLUTE_BROKER_BIN is not set\n");
$work = sys_get_temp_dir() . '/flute-php-' . getmypid();
mkdir($work);
$socket = "{$work}/broker.sock";
$broker = proc_open(
    [$bin, 'serve', '--dev', '--dev-token-lifetime', '3s', '--admin-listen', '', '--listen', "unix:{$socket}"],
    [1 => ['pipe', 'w'], 2 => ['file', "{$work}/log", 'w']],
    $pipes,
);
register_shutdown_function(function () use ($broker, $work) {
    proc_terminate($broker);
    proc_close($broker);
    array_map('unlink', glob("{$work}/*") ?: []);
    @rmdir($work);
});
$emulator = null;
while (($line = fgets($pipes[1])) !== false) {
    if (preg_match('/^\s*emulator:\s+(\S+)/', $line, $m)) {
        $emulator = $m[1];
        break;
    }
}
$emulator ?? exit("FAILED: serve --dev printed no emulator address\n");

$passed = 0;
function check(string $what, bool $ok, string $detail = ''): void
{
    global $passed;
    if (!$ok) {
        fwrite(STDERR, "FAILED: {$what} {$detail}\n");
        exit(1);
    }
    $passed++;
    echo "ok: {$what}\n";
}

function faults(string $emulator, array $faults): void
{
    $curl = curl_init("{$emulator}/__emulator/faults");
    curl_setopt_array($curl, [
        CURLOPT_POSTFIELDS => json_encode($faults),
        CURLOPT_HTTPHEADER => ['Content-Type: application/json'],
        CURLOPT_RETURNTRANSFER => true,
    ]);
    curl_exec($curl);
    curl_close($curl);
}

$client = new FluteBroker($socket);
$token = $client->getTokenWaiting('sandbox', 30);
check('a token', strlen($token['accessToken']) > 0 && strlen($token['tokenId']) === 12);
check('the proto3 JSON fields', $token['environment'] === 'ENVIRONMENT_SANDBOX' && str_ends_with($token['serveFor'], 's'));
[$status] = $client->authorizedGet("{$emulator}/v2/transactions", 'sandbox');
check('the emulator API accepts it', $status === 200, "status {$status}");

$replacement = $client->refreshToken('sandbox', $token['tokenId']);
check('refresh replaces the rejected token', $replacement['tokenId'] !== $token['tokenId']);

$current = $client->getToken('sandbox');
[$next, $etag] = $client->waitForChange('sandbox', $current['tokenId'], 30);
check('waitForChange answers with the next rotation', $next['tokenId'] !== $current['tokenId'] && $etag === $next['tokenId']);

$environments = $client->status();
check('status lists both environments', count($environments) === 2 && $environments[0]['state'] === 'STATE_READY');

try {
    $client->getToken('moon');
    check('an unknown environment is refused', false);
} catch (FluteBrokerError $e) {
    check('an unknown environment: ENVIRONMENT_UNSPECIFIED, 400', $e->reason === 'ENVIRONMENT_UNSPECIFIED' && $e->httpStatus === 400, $e->getMessage());
}

faults($emulator, ['refuse_all' => true, 'status' => 503, 'retry_after' => 2]);
$error = null;
for ($i = 0; $i < 300 && $error === null; $i++) {
    try {
        $client->getToken('sandbox');
        usleep(50_000);
    } catch (FluteBrokerError $e) {
        $error = $e;
    }
}
check(
    'an outage: NO_VALID_TOKEN, 503, retryable, with the retry delay',
    $error !== null && $error->reason === 'NO_VALID_TOKEN' && $error->httpStatus === 503 && $error->retryable() && $error->retryAfter >= 1,
    (string) $error?->getMessage(),
);
faults($emulator, ['clear' => true]);
$recovered = $client->getTokenWaiting('sandbox', 30);
check('getTokenWaiting waits the outage out', strlen($recovered['accessToken']) > 0);
echo "PHP client: {$passed} checks passed\n";
